"""ZeroMQ hygiene in one place: linger 0, bounded message size and high-water marks, port 0
binding that reports the endpoint the OS chose, and a timer wheel driven by the poll timeout."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import re
import socket as pysocket
from collections.abc import Callable

import zmq

from mlfleet.common.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)
_TCP_RE = re.compile(r"^tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)$")


def make_socket(ctx: zmq.Context, kind: int, *, identity: bytes | None = None,
                hwm: int = 100_000) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises instead of vanishing
    return s


_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames: list, flags: int = _NOBLOCK) -> None:
    """``sock.send_multipart(frames, flags, copy=False)`` without its per-frame cost: pyzmq's
    flags are enums, and each ``SNDMORE | flags`` it computes builds one (about a microsecond
    each on the hot path). The same semantics: large frames go without a copy, and with
    NOBLOCK a full queue raises zmq.Again before any frame is taken."""
    send = sock.send
    more = flags | _SNDMORE
    for f in frames[:-1]:
        send(f, more, copy=False)
    send(frames[-1], flags, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = _NOBLOCK) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)`` reading each frame's more-flag from the frame
    itself (``getsockopt(RCVMORE)``, as pyzmq asks, is a microsecond or more per frame)."""
    recv = sock.recv
    f = recv(flags, copy=False)
    frames = [f]
    while f.more:
        f = recv(flags, copy=False)
        frames.append(f)
    return frames


ROUTING_ID_CHOSEN = "peers may not choose their own routing id (ZMQ_ROUTING_ID): connect without one"


def assigned_routing_id(ident: bytes) -> bool:
    """Whether a ROUTER picked this peer's routing id (5 bytes, the first zero) rather than the
    peer itself. Our clients and agents never choose one; a peer that does could take or hold a
    name another peer is known by, so servers do not act on its messages."""
    return len(ident) == 5 and ident[0] == 0


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, turning port 0 into an OS-chosen port; returns the endpoint actually bound."""
    m = _TCP_RE.match(endpoint)
    if m and m.group(2) == "0":
        endpoint = f"tcp://{m.group(1)}:*"
    sock.bind(endpoint)
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = _TCP_RE.match(endpoint)
    if not m:
        return False
    host = m.group(1).strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(pysocket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def check_endpoint(endpoint: str, option: str) -> None:
    if not (_TCP_RE.match(endpoint) or endpoint.startswith(("ipc://", "inproc://"))):
        raise ValueError(f"[{option}] must look like tcp://HOST:PORT, got [{endpoint}]")


class Timers:
    """Periodic and one-shot callbacks; ``timeout_ms`` feeds the poller so no thread is needed.
    A callback that raises is logged and counted; the loop goes on."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._now = monotonic
        self._heap: list[tuple[float, int, Callable[[], None], float | None]] = []
        self._seq = itertools.count()
        self.errors = 0

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (self._now() + interval_s, next(self._seq), fn, interval_s))

    def at(self, due: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), fn, None))

    def timeout_ms(self, cap_ms: int = 1000) -> int:
        if not self._heap:
            return cap_ms
        return max(0, min(cap_ms, int((self._heap[0][0] - self._now()) * 1000) + 1))

    def run_due(self) -> None:
        now = self._now()
        while self._heap and self._heap[0][0] <= now:
            due, _, fn, interval = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                self.errors += 1
                log.exception("timer callback %s failed", getattr(fn, "__name__", fn))
            if interval is not None:
                heapq.heappush(self._heap, (max(due + interval, now), next(self._seq), fn, interval))

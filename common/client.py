"""The Python client: the public API of mlfleet.

One background I/O thread owns every ZeroMQ socket (DEALERs to the coordinator and to each agent
it sends inference to); callers on any thread hand it requests and wait on futures, so a Client
may be shared between threads and keeps many requests in flight. Inference goes straight to an
agent picked from the deployment's routing table (weighted by current allocations); the table
is cached and refreshed when an agent reports a newer routing version or a node answers that it
no longer serves the deployment.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures as cf
import hashlib
import itertools
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Optional

import zmq

from mlfleet.common import errors
from mlfleet.common.errors import ApiError, NoAnswer, ServiceUnavailable
from mlfleet.common.messages import MAX_TIMEOUT_MS
from mlfleet.common.protocol import (
    PAYLOAD_LIMITS,
    Buffer,
    Reply,
    decode_payload,
    decode_reply,
    decode_tree,
    encode_payload,
    encode_request,
)
from mlfleet.common.security import Curve, client_curve
from mlfleet.common.units import format_time, parse_time
from mlfleet.common.zmqutil import make_socket, recv_frames, send_frames

DEFAULT_COORDINATOR = "tcp://127.0.0.1:7600"
UPLOAD_CHUNK = 4 << 20
START_MARGIN_S = 10.0
INFER_MARGIN_S = 5.0
ROUTING_TTL_S = 60.0
CONNECT_TIMEOUT_S = 5.0
INFER_CONNECT_TIMEOUT_S = 1.0  # an agent that does not take the connection: try another node
MAX_WAIT_S = 7 * 86400.0


def _encode(op: str, rid: int, body: dict[str, Any]) -> bytes:
    """A request's frame; a value msgpack cannot carry (an int past 64 bits, a value nested past
    what the encoder can walk) is the caller's error, raised as the server would answer it."""
    try:
        return encode_request(op, rid, body)
    except (OverflowError, TypeError, ValueError, RecursionError) as e:
        raise _unencodable(e) from None


def _encode_payload(docs: Any) -> list[Buffer]:
    try:
        return encode_payload(docs)
    except (OverflowError, TypeError, ValueError, RecursionError) as e:
        raise _unencodable(e) from None


def _unencodable(e: BaseException) -> errors.BadRequest:
    if isinstance(e, RecursionError) or "recursion limit" in str(e):
        return errors.BadRequest("the request cannot be encoded: its values nest too deeply (lists and "
                                 "objects may nest at most a few hundred levels)")
    return errors.BadRequest(f"the request cannot be encoded: {type(e).__name__}: {e}")


def _infer_timeout_s(timeout: str | float) -> float:
    """An inference's ``timeout`` in seconds; one that is unreadable, not finite, not positive or
    past the longest an inference may wait is the caller's error, named as the server names it."""
    try:
        timeout_s = parse_time(timeout, "timeout")
    except ValueError as e:
        raise errors.BadRequest(str(e)) from None
    if timeout_s <= 0:
        raise errors.BadRequest("[timeout] must be positive")
    if timeout_s > MAX_TIMEOUT_MS / 1000:
        longest = format_time(MAX_TIMEOUT_MS / 1000)
        raise errors.BadRequest(f"[timeout] must be less than or equal to {longest} for an inference, "
                                f"got [{str(timeout)[:80]}]")
    return timeout_s


def _recv_reply(s: zmq.Socket, flags: int = 0) -> Reply:
    """``[header, *payload]`` from an agent: the header decoded, the payload frames kept as they
    came (no copy) for ``_results``."""
    frames = recv_frames(s, flags)
    rep = decode_reply(frames[0].buffer)
    rep.payload.extend(frames[1:])
    return rep


def _results(rep: Reply) -> dict[str, Any]:
    """A 200 inference reply's body: its results, arrays as numpy arrays built on the reply's
    frames (read-only views, no copy)."""
    if not rep.payload:
        raise errors.ServerError("malformed reply: an inference answer without its results frame")
    return {**rep.body, "inference_results": decode_tree(decode_payload(rep.payload, PAYLOAD_LIMITS))}


def start_wait_s(timeout: Any, request_timeout_s: float) -> float:
    """How long a start waits for its answer: its ``timeout`` plus a margin, at least
    ``request_timeout_s``; a bad or absurd timeout waits ``request_timeout_s`` (the server
    answers 400 naming it)."""
    try:
        wait = parse_time(timeout) + START_MARGIN_S
    except ValueError:
        return request_timeout_s
    if not math.isfinite(wait) or wait > MAX_WAIT_S:
        return request_timeout_s
    return max(wait, request_timeout_s)


class _IO(threading.Thread):
    """Owns the sockets. Requests come in through a deque plus a wake-up pipe."""

    def __init__(self, curve: Optional[Curve] = None) -> None:
        super().__init__(name="mlfleet-client-io", daemon=True)
        self.ctx = zmq.Context()
        self.curve = curve
        self.inbox: collections.deque = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.socks: dict[str, zmq.Socket] = {}
        self.monitors: dict[zmq.Socket, str] = {}   # socket monitor -> address
        self.failed: dict[str, str] = {}             # address -> why its handshake failed
        self.pending: dict[int, cf.Future] = {}
        self.unsent: list[tuple[str, bytes, int, cf.Future, float]] = []
        self.running = True
        self.closed = False  # the wake-up pipe is closed: its fd numbers may be another file's now
        self._wake_lock = threading.Lock()
        self.poller = zmq.Poller()
        self.poller.register(self.wake_r, zmq.POLLIN)

    def submit(self, address: str, frame: bytes, rid: int) -> cf.Future:
        fut: cf.Future = cf.Future()
        if not self._enqueue(("send", address, frame, rid, fut)):
            fut.set_exception(NoAnswer("the client is closed"))
        return fut

    def forget(self, rid: int, address: str | None = None) -> None:
        self._enqueue(("forget", address, None, rid, None))

    def _enqueue(self, item: tuple[Any, ...] | None) -> bool:
        """Hand ``item`` (None: only wake) to the thread; False once it has closed. Under the
        lock the thread closes its wake-up pipe with: never a write into an fd number it gave
        back, and nothing enqueued after its last look at the inbox."""
        with self._wake_lock:
            if self.closed:
                return False
            if item is not None:
                self.inbox.append(item)
            try:
                os.write(self.wake_w, b"x")
            except OSError:  # full: the thread will drain it
                pass
            return True

    def _sock(self, address: str) -> zmq.Socket:
        s = self.socks.get(address)
        if s is None:
            s = make_socket(self.ctx, zmq.DEALER)
            s.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: fail fast otherwise
            if self.curve is not None:
                self.curve.client(s)
            mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            s.connect(address)
            self.socks[address] = s
            self.monitors[mon] = address
            self.poller.register(s, zmq.POLLIN)
            self.poller.register(mon, zmq.POLLIN)
        return s

    def _reset(self, address: str) -> None:
        s = self.socks.pop(address, None)
        if s is not None:
            for mon, addr in list(self.monitors.items()):
                if addr == address:
                    self.poller.unregister(mon)
                    del self.monitors[mon]
                    s.disable_monitor()
                    mon.close(0)
            self.poller.unregister(s)
            s.close(0)

    def _on_monitor(self, mon: zmq.Socket) -> None:
        """A handshake that fails says why at once, instead of a timeout that says nothing."""
        from zmq.utils.monitor import recv_monitor_message
        address = self.monitors[mon]
        while True:
            try:
                ev = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed.pop(address, None)
                continue
            self.failed[address] = handshake_failure(address, ev["event"], ev["value"],
                                                     self.curve is not None)
            for item in [u for u in self.unsent if u[0] == address]:
                self.unsent.remove(item)
                self.pending.pop(item[2], None)
                if not item[3].done():
                    item[3].set_exception(NoAnswer(self.failed[address]))

    def _try_send(self, address: str, frame: bytes, rid: int, fut: cf.Future, deadline: float) -> None:
        try:
            self._sock(address).send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if address in self.failed:
                self.pending.pop(rid, None)
                fut.set_exception(NoAnswer(self.failed[address]))
            elif time.monotonic() < deadline:
                self.unsent.append((address, frame, rid, fut, deadline))
            else:
                self.pending.pop(rid, None)
                self._reset(address)
                hint = "" if self.curve else " (is it running? off loopback it needs a CURVE key)"
                fut.set_exception(NoAnswer(f"no answer from {address}: could not connect within "
                                           f"{CONNECT_TIMEOUT_S:g}s{hint}"))
        except zmq.ZMQError as e:
            self.pending.pop(rid, None)
            fut.set_exception(NoAnswer(f"could not send to {address}: {e}"))

    def run(self) -> None:
        while self.running:
            events = dict(self.poller.poll(20 if self.unsent else 500))
            retry, self.unsent = self.unsent, []
            for address, frame, rid, fut, deadline in retry:
                if rid in self.pending:
                    self._try_send(address, frame, rid, fut, deadline)
            if self.wake_r in events:
                try:
                    os.read(self.wake_r, 65536)
                except BlockingIOError:
                    pass
            while self.inbox:
                kind, address, frame, rid, fut = self.inbox.popleft()
                if kind == "send":
                    if fut.set_running_or_notify_cancel():
                        self.pending[rid] = fut
                        self._try_send(address, frame, rid, fut, time.monotonic() + CONNECT_TIMEOUT_S)
                elif kind == "forget":
                    self.pending.pop(rid, None)
                    if address is not None:
                        self._reset(address)
            for mon in list(self.monitors):
                if mon in events:
                    self._on_monitor(mon)
            for s in list(self.socks.values()):
                if s in events:
                    for _ in range(1024):
                        try:
                            frame = s.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            rep = decode_reply(frame)
                        except ApiError:
                            continue
                        fut = self.pending.pop(rep.id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(rep)
        for s in self.socks.values():
            s.close(0)
        with self._wake_lock:
            self.closed = True
            os.close(self.wake_r)
            os.close(self.wake_w)
        unsent = [item[4] for item in self.inbox if item[4] is not None]  # came while we stopped
        self.inbox.clear()
        for fut in [*self.pending.values(), *unsent]:
            if not fut.done():
                fut.set_exception(NoAnswer("the client is closed"))

    def stop(self) -> None:
        self.running = False
        self._enqueue(None)


def handshake_failure(address: str, event: int, value: int, have_keys: bool) -> str:
    """What a failed ZeroMQ handshake means, said so that the user knows what to do."""
    how = ("pass secret_key= and server_public_key= to Client (the CLI: --secret-key and "
           "--coordinator-key; or MLFLEET_SECRET_KEY and MLFLEET_COORDINATOR_KEY), with a key made by "
           "`mlfleet keys generate NAME --out DIR` and listed in the coordinator's authorized keys")
    mismatch = event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == getattr(
        zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002)
    if not have_keys:  # a keyless client can only fail against a server that wants keys
        return f"the server at {address} requires CURVE keys and this client has none: {how}"
    if mismatch:
        return (f"the server at {address} does not use CURVE keys, but this client was given some: "
                "connect without secret_key and server_public_key")
    return (f"the CURVE handshake with {address} failed: the server's public key is not the one "
            "given (server_public_key / MLFLEET_COORDINATOR_KEY), or the server refused this key")


class _ThreadSockets:
    """One DEALER per agent address for the calling thread: inference needs no hand-off to the
    I/O thread (two fewer thread switches per request). Closed when the thread goes away."""

    def __init__(self, ctx: zmq.Context, curve: Optional[Curve], keys: dict[str, bytes]) -> None:
        self.ctx = ctx
        self.curve = curve
        self.keys = keys  # agent address -> its CURVE public key, from routing tables
        self.socks: dict[str, zmq.Socket] = {}
        self.pollers: dict[zmq.Socket, zmq.Poller] = {}  # Socket.poll builds a Poller per call

    def get(self, address: str) -> zmq.Socket:
        s = self.socks.get(address)
        if s is None:
            s = make_socket(self.ctx, zmq.DEALER)
            s.setsockopt(zmq.IMMEDIATE, 1)
            if self.curve is not None:
                self.curve.client(s, self.keys.get(address))
            s.connect(address)
            self.socks[address] = s
            self.pollers[s] = p = zmq.Poller()
            p.register(s, zmq.POLLIN)
        return s

    def drop(self, address: str) -> None:
        s = self.socks.pop(address, None)
        if s is not None:
            self.pollers.pop(s, None)
            s.close(0)

    def close(self) -> None:
        for s in self.socks.values():
            try:
                s.close(0)
            except zmq.ZMQError:
                pass
        self.socks.clear()
        self.pollers.clear()

    def __del__(self) -> None:
        self.close()

    def call(self, address: str, frames: list[Buffer], rid: int, wait_s: float, op: str) -> Reply:
        s = self.get(address)
        deadline = time.monotonic() + wait_s
        connect_by = time.monotonic() + min(wait_s, INFER_CONNECT_TIMEOUT_S)
        while True:
            try:
                send_frames(s, frames)
                break
            except zmq.Again:
                if time.monotonic() >= connect_by:
                    self.drop(address)
                    # never sent: safe to try another node
                    raise NoAnswer(f"no answer from {address}: could not connect within "
                                   f"{INFER_CONNECT_TIMEOUT_S:g}s", retryable=True) from None
                s.poll(20, zmq.POLLOUT)
        poller = self.pollers[s]
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                if time.monotonic() < deadline:
                    continue
                self.drop(address)  # a fresh socket next time (lazy pirate)
                raise NoAnswer(f"no answer from {address} to [{op}] within {wait_s:g}s")
            try:
                rep = _recv_reply(s)
            except ApiError:
                continue
            if rep.id == rid:
                return rep


class Routes:
    """A deployment's routing table as the client caches it."""

    def __init__(self, body: dict[str, Any], fetched: float) -> None:
        self.version = int(body.get("version", 0))
        self.fetched = fetched
        routes = [r for r in body.get("routes", []) if r.get("routing_state") == "started"
                  and r.get("current_allocations", 0) > 0]
        if not routes:  # Elasticsearch falls back to stopping routes
            routes = [r for r in body.get("routes", []) if r.get("current_allocations", 0) > 0]
        self.routes = routes

    def pick(self, exclude: set[str]) -> Optional[dict[str, Any]]:
        choices = [(r, r["current_allocations"]) for r in self.routes
                   if r["address"] not in exclude]
        if not choices:
            return None
        if len(choices) == 1:
            return choices[0][0]
        cum = list(itertools.accumulate(w for _, w in choices))
        return choices[bisect.bisect_left(cum, random.randint(1, cum[-1]))][0]


class Client:
    def __init__(self, coordinator: str | None = None, *, request_timeout: str | float = "30s",
                 secret_key: str | None = None, server_public_key: str | None = None,
                 routing_ttl: str | float = ROUTING_TTL_S) -> None:
        self.coordinator = coordinator or os.environ.get("MLFLEET_COORDINATOR") or DEFAULT_COORDINATOR
        self.request_timeout_s = parse_time(request_timeout, "request_timeout")
        self.routing_ttl_s = parse_time(routing_ttl, "routing_ttl")  # refresh a table this old
        self._ids = itertools.count(1)
        self._curve = client_curve(secret_key, server_public_key)
        self._agent_keys: dict[str, bytes] = {}
        self._io = _IO(self._curve)
        self._io.start()
        self._routing: dict[str, Routes] = {}
        self._routing_lock = threading.Lock()
        self._local = threading.local()

    # ---- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._io.stop()
        self._io.join(5)
        self._local = threading.local()
        self._io.ctx.destroy(linger=0)  # also closes every thread's inference sockets

    def _infer_sockets(self) -> _ThreadSockets:
        socks = getattr(self._local, "socks", None)
        if socks is None:
            if self._io.closed or not self._io.running:
                raise NoAnswer("the client is closed")
            socks = self._local.socks = _ThreadSockets(self._io.ctx, self._curve, self._agent_keys)
        return socks

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, address: str, op: str, body: dict[str, Any], wait_s: float):
        rid = next(self._ids)
        fut = self._io.submit(address, _encode(op, rid, body), rid)
        try:
            rep = fut.result(wait_s)
        except cf.TimeoutError:
            self._io.forget(rid, address)  # a fresh socket next time (lazy pirate)
            raise NoAnswer(f"no answer from {address} to [{op}] within {wait_s:g}s") from None
        return rep

    def _call(self, op: str, body: dict[str, Any], wait_s: float | None = None) -> dict[str, Any]:
        rep = self._send(self.coordinator, op, body, wait_s or self.request_timeout_s)
        if rep.status != 200:
            raise errors.from_body(rep.body)
        return rep.body

    # ---- models --------------------------------------------------------------------------------
    def put_model(self, model_id: str, path: str | os.PathLike[str], task: str = "pass_through",
                  tokenizer: str | os.PathLike[str] | None = None,
                  model_config: dict[str, Any] | None = None) -> dict[str, Any]:
        upload_id = os.urandom(16).hex()
        h = hashlib.sha256()
        offset = 0
        with open(path, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                h.update(chunk)
                self._call("put_model_chunk", {"upload_id": upload_id, "offset": offset, "data": chunk})
                offset += len(chunk)
        body: dict[str, Any] = {"model_id": model_id, "upload_id": upload_id, "sha256": h.hexdigest(),
                                "task": task}
        if tokenizer is not None:
            body["tokenizer"] = Path(tokenizer).read_bytes()
        if model_config is not None:
            body["model_config"] = model_config
        return self._call("put_model", body)

    def import_hf_model(self, model_id: str, path: str | os.PathLike[str], task: str | None = None,
                        max_sequence_length: int | None = None,
                        model_format: str = "export") -> dict[str, Any]:
        """Export (or trace, ``model_format="torchscript"``) a local Hugging Face model directory
        and put it (needs the hf extra). ``task``: by default the one its config.json names."""
        from mlfleet.common.hf import import_hf
        return import_hf(self, model_id, path, task=task, max_sequence_length=max_sequence_length,
                         format=model_format)

    def get_models(self, model_id: str | None = None) -> dict[str, Any]:
        return self._call("get_models", {"model_id": model_id} if model_id else {})

    def delete_model(self, model_id: str) -> dict[str, Any]:
        return self._call("delete_model", {"model_id": model_id})

    # ---- deployments ---------------------------------------------------------------------------
    def start_deployment(self, model_id: str, deployment_id: str | None = None,
                         number_of_allocations: int | None = None, threads_per_allocation: int = 1,
                         queue_capacity: int = 1024, priority: str = "normal",
                         cache_size: str | None = None, timeout: str = "30s",
                         wait_for: str = "started",
                         adaptive_allocations: dict[str, Any] | None = None,
                         max_batch_size: int | None = None,
                         max_batch_delay: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": model_id, "threads_per_allocation": threads_per_allocation,
                                "queue_capacity": queue_capacity, "priority": priority,
                                "timeout": timeout, "wait_for": wait_for}
        for k, v in (("deployment_id", deployment_id), ("number_of_allocations", number_of_allocations),
                     ("cache_size", cache_size), ("adaptive_allocations", adaptive_allocations),
                     ("max_batch_size", max_batch_size), ("max_batch_delay", max_batch_delay)):
            if v is not None:
                body[k] = v
        return self._call("start_deployment", body, start_wait_s(timeout, self.request_timeout_s))

    def update_deployment(self, deployment_id: str, number_of_allocations: int | None = None,
                          adaptive_allocations: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"deployment_id": deployment_id}
        if number_of_allocations is not None:
            body["number_of_allocations"] = number_of_allocations
        if adaptive_allocations is not None:
            body["adaptive_allocations"] = adaptive_allocations
        return self._call("update_deployment", body)

    def stop_deployment(self, deployment_id: str, force: bool = False, allow_no_match: bool = True,
                        finish_pending_work: bool = False) -> dict[str, Any]:
        with self._routing_lock:
            self._routing.pop(deployment_id, None)
        return self._call("stop_deployment", {"deployment_id": deployment_id, "force": force,
                                              "allow_no_match": allow_no_match,
                                              "finish_pending_work": finish_pending_work},
                          max(self.request_timeout_s, 40.0))

    def clear_cache(self, deployment_id: str) -> dict[str, Any]:
        return self._call("clear_cache", {"deployment_id": deployment_id})

    def get_stats(self, deployment_id: str | None = None) -> dict[str, Any]:
        return self._call("get_stats", {"deployment_id": deployment_id} if deployment_id else {})

    def get_nodes(self) -> dict[str, Any]:
        return self._call("get_nodes", {})

    def rotate_node_key(self, node_id: str, public_key: str | os.PathLike[str]) -> dict[str, Any]:
        """Move a node id to another agent key (admin): ``public_key`` is the new key's z85 text
        or its NAME.pub file. The agent running now keeps serving; restart it with the new key."""
        from mlfleet.common.security import public_key_text
        return self._call("rotate_node_key", {"node_id": node_id, "public_key": public_key_text(public_key)})

    def get_routing(self, deployment_id: str) -> dict[str, Any]:
        return self._call("get_routing", {"deployment_id": deployment_id})

    # ---- inference -----------------------------------------------------------------------------
    def _routes(self, deployment_id: str, refresh: bool = False) -> Routes:
        with self._routing_lock:
            r = self._routing.get(deployment_id)
        if r is None or refresh or time.monotonic() - r.fetched > self.routing_ttl_s:
            try:
                body = self.get_routing(deployment_id)
            except NoAnswer:
                if r is None:
                    raise
                # the coordinator is away: keep serving from the table we have, ask again later
                r.fetched = time.monotonic() - self.routing_ttl_s + min(5.0, self.routing_ttl_s)
                return r
            r = Routes(body, time.monotonic())
            self._remember_keys(r)
            with self._routing_lock:
                self._routing[deployment_id] = r
        return r

    def _await_routes(self, deployment_id: str, until: float) -> Routes:
        """No allocation to send to: the coordinator answers once one serves (starting one if the
        deployment scaled to zero), or with 408 at our deadline."""
        left = max(0.001, until - time.monotonic())
        body = self._call("await_routes", {"deployment_id": deployment_id,
                                           "timeout_ms": max(1, int(left * 1000))}, left + INFER_MARGIN_S)
        r = Routes(body, time.monotonic())
        self._remember_keys(r)
        with self._routing_lock:
            self._routing[deployment_id] = r
        return r

    def _remember_keys(self, r: Routes) -> None:
        for route in r.routes:
            if route.get("public_key"):
                self._agent_keys[route["address"]] = route["public_key"].encode()

    def infer_many(self, deployment_id: str, requests: list[list[dict[str, Any]]],
                   timeout: str | float = "10s", inflight: int = 16,
                   inference_config: Optional[dict[str, Any]] = None) -> list[Any]:
        """Run many inference requests from this thread with up to ``inflight`` outstanding at
        once, spread over the routing table. Returns, in order, each request's body or the
        ApiError it got (a request whose node said it no longer serves the deployment is
        retried through ``infer``)."""
        timeout_s = _infer_timeout_s(timeout)
        extra = {} if inference_config is None else {"inference_config": inference_config}
        routes = self._routes(deployment_id)
        socks = self._infer_sockets()
        out: list[Any] = [None] * len(requests)
        waiting: dict[int, tuple[int, str, float]] = {}  # rid -> (index, address, deadline)
        poller = zmq.Poller()
        registered: set[str] = set()
        nxt = 0
        while nxt < len(requests) or waiting:
            while nxt < len(requests) and len(waiting) < inflight:
                route = routes.pick(set())
                if route is None:  # nothing routable: this one waits (and may start an allocation)
                    try:
                        out[nxt] = self.infer(deployment_id, requests[nxt], timeout, inference_config)
                    except ApiError as e:
                        out[nxt] = e
                    nxt += 1
                    routes = self._routes(deployment_id)
                    continue
                address, rid = route["address"], next(self._ids)
                frames = [_encode("infer", rid, {"deployment_id": deployment_id,
                                                 "timeout_ms": max(1, int(timeout_s * 1000)), **extra}),
                          *_encode_payload(requests[nxt])]
                s = socks.get(address)
                if address not in registered:
                    poller.register(s, zmq.POLLIN)
                    registered.add(address)
                try:
                    send_frames(s, frames)
                except zmq.Again:  # no connection to that node: the one-by-one path retries elsewhere
                    try:
                        out[nxt] = self.infer(deployment_id, requests[nxt], timeout, inference_config)
                    except ApiError as e:
                        out[nxt] = e
                    nxt += 1
                    routes = self._routes(deployment_id, refresh=True)
                    continue
                waiting[rid] = (nxt, address, time.monotonic() + timeout_s + INFER_MARGIN_S)
                nxt += 1
            if not waiting:
                continue
            events = dict(poller.poll(100))
            for address in list(registered):
                s = socks.get(address)
                if s not in events:
                    continue
                while True:
                    try:
                        rep = _recv_reply(s, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ApiError:
                        continue
                    entry = waiting.pop(rep.id, None)
                    if entry is None:
                        continue
                    i = entry[0]
                    if rep.status == 200:
                        try:
                            out[i] = _results(rep)
                        except ApiError as e:
                            out[i] = e
                    else:
                        err = errors.from_body(rep.body)
                        if err.retryable:
                            try:
                                out[i] = self.infer(deployment_id, requests[i], timeout, inference_config)
                            except ApiError as e:
                                out[i] = e
                        else:
                            out[i] = err
            now = time.monotonic()
            for rid, (i, address, deadline) in list(waiting.items()):
                if now > deadline:
                    waiting.pop(rid)
                    out[i] = NoAnswer(f"no answer from {address} to [infer] within {timeout_s:g}s")
        return out

    def infer(self, deployment_id: str, docs: list[dict[str, Any]],
              timeout: str | float = "10s",
              inference_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Run ``docs`` through a deployment; arrays in and out are numpy arrays.
        ``inference_config``: Elasticsearch's infer-time overrides for the model's task, e.g.
        ``{"num_top_classes": 3}`` or ``{"results_field": "label"}``."""
        timeout_s = _infer_timeout_s(timeout)
        payload = _encode_payload(docs)
        extra = {} if inference_config is None else {"inference_config": inference_config}
        deadline = time.monotonic() + timeout_s + INFER_MARGIN_S
        routes = self._routes(deployment_id)
        tried: set[str] = set()
        last: ApiError | None = None
        for _attempt in range(8):
            route = routes.pick(tried)
            if route is None:
                routes = self._routes(deployment_id, refresh=True)
                route = routes.pick(tried)
                if route is None:
                    if time.monotonic() >= deadline - INFER_MARGIN_S:
                        raise last or ServiceUnavailable(f"Trained model deployment [{deployment_id}] "
                                                         "is not allocated to any nodes")
                    routes = self._await_routes(deployment_id, deadline - INFER_MARGIN_S)
                    tried = set()  # what answers now has an allocation again
                    route = routes.pick(tried)
                    if route is None:
                        raise ServiceUnavailable(f"Trained model deployment [{deployment_id}] is not "
                                                 "allocated to any nodes")
            address = route["address"]
            rid = next(self._ids)
            left_s = deadline - INFER_MARGIN_S - time.monotonic()  # a retry gets what is left
            frames = [_encode("infer", rid, {"deployment_id": deployment_id,
                                             "timeout_ms": max(1, int(left_s * 1000)), **extra}), *payload]
            try:
                rep = self._infer_sockets().call(address, frames, rid,
                                                 max(0.1, deadline - time.monotonic()), "infer")
            except NoAnswer as e:
                if not e.retryable:
                    raise  # sent, maybe started: not ours to run twice
                last = e
                tried.add(address)
                routes = self._routes(deployment_id, refresh=True)
                continue
            if rep.rv > routes.version:
                with self._routing_lock:
                    self._routing.pop(deployment_id, None)
            if rep.status == 200:
                return _results(rep)
            err = errors.from_body(rep.body)
            if not err.retryable:
                raise err
            last = err  # the node no longer serves it; the request never ran: try another
            tried.add(address)
            routes = self._routes(deployment_id, refresh=True)
        raise last or ServiceUnavailable(f"no node could serve deployment [{deployment_id}]")

"""The agent's end of its allocation workers' channels: one listening AF_UNIX stream socket in
the agent's private run directory (mode 0700: only this user can connect), one stream per worker,
messages framed by common/stream.py.

A worker connects and sends its identity (``<deployment>|<node>|<worker id>``) as its first
message; every later message is a protocol envelope and payload frames, handed to
``on_message(identity, frames)``. Who connected is known from the kernel (SO_PEERCRED), not
from what it says: a process of another user is refused at once, and ``authorize(identity,
pid)`` decides whether that process may speak as that identity (the agent: a child of that
deployment's model host, so a model of one deployment cannot answer for another's). A stream
that breaks the framing, whose first message is not an identity, or that is not authorized, is
closed; a second stream with an identity already connected replaces the first (a worker that
reconnects). Writes never block the agent's loop: what a worker's socket
does not take waits in the stream's writer, and its fd is polled for POLLOUT until it drains.

Until a stream has said who it is, it is held to one small message (its identity), at most
``MAX_UNIDENTIFIED`` such streams are kept (a new one closes the oldest), and ``tick`` closes
those that have not identified within ``IDENTIFY_WITHIN_S``. A worker whose writer holds more
than ``MAX_WAITING_BYTES`` (it does not read what it is sent) is closed. Out of fds, the agent
stops accepting for ``ACCEPT_PAUSE_S`` rather than spin on a backlog it cannot take.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from mlfleet.common import stream

log = logging.getLogger(__name__)
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
MAX_IDENTITY = 512
MAX_UNIDENTIFIED = 64        # streams connected that have not said who they are
IDENTIFY_WITHIN_S = 10.0     # ... and the time they have to
MAX_WAITING_BYTES = stream.MAX_BYTES + (1 << 20)  # one batch at most, and a control message
ACCEPT_PAUSE_S = 0.5


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Link:
    __slots__ = ("sock", "fd", "reader", "writer", "identity", "pid", "since")

    def __init__(self, sock: socket.socket, pid: int, since: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = stream.Reader(sock, max_frames=1, max_bytes=MAX_IDENTITY, first_alone=True)
        self.writer = stream.Writer(sock)
        self.identity: bytes | None = None
        self.pid = pid
        self.since = since


class WorkerLinks:
    def __init__(self, path: str, poller: zmq.Poller,
                 on_message: Callable[[bytes, list[memoryview]], None],
                 authorize: Callable[[bytes, int], str | None] = lambda identity, pid: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.poller = poller
        self.on_message = on_message
        self.authorize = authorize
        self.clock = clock
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.setblocking(False)
        self.fd = -1
        self.by_fd: dict[int, _Link] = {}
        self.by_identity: dict[bytes, _Link] = {}
        self.unidentified: dict[int, _Link] = {}  # by fd, oldest first
        self.accepted = 0
        self._paused_until: float | None = None  # out of fds: the listener is not polled until then

    def bind(self) -> None:
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self.listener.listen(1024)
        self.fd = self.listener.fileno()
        self.poller.register(self.fd, _POLLIN)

    def handles(self, fd: Any) -> bool:
        return fd == self.fd or fd in self.by_fd

    def on_event(self, fd: int, ev: int) -> None:
        if fd == self.fd:
            self._accept()
            return
        link = self.by_fd.get(fd)
        if link is None:
            return
        try:
            if ev & _POLLOUT and link.writer.flush():
                self.poller.modify(fd, _POLLIN)
        except OSError as e:  # EPIPE, ECONNRESET: the worker is gone; its host reports the exit
            self._drop(link, str(e))
            return
        if ev & _POLLIN or not ev & _POLLOUT:  # POLLERR/POLLHUP: the read finds out
            self._read(link)

    def tick(self, now: float) -> None:
        """Close streams that have not said who they are in time; listen again after a pause."""
        for link in list(self.unidentified.values()):
            if now - link.since < IDENTIFY_WITHIN_S:
                break  # oldest first: the rest are younger
            self._drop(link, f"it did not say which worker it is within {IDENTIFY_WITHIN_S:g}s")
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self.poller.register(self.fd, _POLLIN)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the connection stays in the backlog: polling on would spin; the worker waits
                    self._paused_until = self.clock() + ACCEPT_PAUSE_S
                    self.poller.unregister(self.fd)
                log.warning("agent: accepting a worker's connection failed: %s", e)
                return
            self.accepted += 1
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            pid, uid, _gid = _UCRED.unpack(cred)
            if uid != os.getuid():
                log.warning("agent: refused a connection to the worker socket from pid %d (uid %d, "
                            "not ours)", pid, uid)
                sock.close()
                continue
            if len(self.unidentified) >= MAX_UNIDENTIFIED:
                oldest = next(iter(self.unidentified.values()))
                self._drop(oldest, f"more than {MAX_UNIDENTIFIED} streams have not said which worker "
                                   "they are; the oldest goes")
            sock.setblocking(False)
            link = _Link(sock, pid, self.clock())
            self.by_fd[link.fd] = link
            self.unidentified[link.fd] = link
            self.poller.register(link.fd, _POLLIN)

    def _read(self, link: _Link) -> None:
        try:
            msgs = link.reader.read()
        except EOFError:
            self._drop(link, None)
            return
        except (stream.StreamError, OSError) as e:
            self._drop(link, str(e))
            return
        for frames in msgs:
            if link.identity is None:
                ident = bytes(frames[0])
                if len(frames) != 1 or not 0 < len(ident) <= MAX_IDENTITY or ident.count(b"|") != 2:
                    self._drop(link, "its first message is not a worker identity")
                    return
                why = self.authorize(ident, link.pid)
                if why is not None:
                    self._drop(link, f"pid {link.pid} may not speak as this worker: {why}")
                    return
                old = self.by_identity.get(ident)
                if old is not None:
                    self._drop(old, "the same worker connected again")
                link.identity = ident
                self.by_identity[ident] = link
                del self.unidentified[link.fd]
                try:  # what came behind the identity is read within a worker's limits
                    msgs.extend(link.reader.set_limits(stream.MAX_FRAMES, stream.MAX_BYTES))
                except stream.StreamError as e:
                    self._drop(link, str(e))
                    return
                continue
            if self.by_fd.get(link.fd) is not link:  # dropped while handling an earlier message
                return
            try:  # as the agent's other drains: a fault in one message loses no other
                self.on_message(link.identity, frames)
            except Exception:
                log.exception("agent: handling a message from worker [%s] failed",
                              link.identity.decode(errors="replace"))

    def send(self, identity: bytes, frames: Sequence[Any]) -> bool:
        """Send a message to a connected worker; False (and nothing sent) when it is not."""
        link = self.by_identity.get(identity)
        if link is None:
            return False
        try:
            if not link.writer.send(frames):
                if link.writer.waiting_bytes > MAX_WAITING_BYTES:
                    self._drop(link, f"it does not read what it is sent ([{link.writer.waiting_bytes}] "
                                     f"bytes waiting; at most [{MAX_WAITING_BYTES}])")
                    return False
                self.poller.modify(link.fd, _POLLIN | _POLLOUT)
        except OSError as e:  # EPIPE, ECONNRESET: the worker is gone; its host reports the exit
            self._drop(link, str(e))
            return False
        return True

    def _drop(self, link: _Link, why: str | None) -> None:
        if self.by_fd.pop(link.fd, None) is None:
            return
        self.unidentified.pop(link.fd, None)
        if link.identity is not None and self.by_identity.get(link.identity) is link:
            del self.by_identity[link.identity]
        if why:
            log.warning("agent: closing worker [%s]'s stream: %s",
                        (link.identity or b"?").decode(errors="replace"), why)
        try:
            self.poller.unregister(link.fd)
        except KeyError:
            pass
        link.sock.close()

    def close(self) -> None:
        for link in list(self.by_fd.values()):
            self._drop(link, None)
        if self.fd >= 0 and self._paused_until is None:
            try:
                self.poller.unregister(self.fd)
            except KeyError:
                pass
        self.listener.close()

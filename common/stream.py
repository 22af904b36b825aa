"""Multi-frame messages over a stream socket: the agent <-> allocation-worker channel.

A message is ``[n: u32][len_1 .. len_n: u32][frame_1 .. frame_n]`` (little-endian): a frame
count, each frame's length, then the frames back to back. The frames are the same as ZeroMQ
would carry (a header envelope, then payload frames; common/protocol.py), so only the transport
changed: between two processes of one host, an AF_UNIX stream wakes the reader directly, where
a ZeroMQ hop hands each message from the sending thread to its I/O thread and from the
receiving I/O thread to the receiver (four thread switches a round trip, on top of the socket's
own). Writes gather the frames with ``sendmsg`` (no copy in Python); reads land in one buffer
per message (small messages: one copy out of a shared read buffer; large ones: read straight
into their own buffer), and a message's frames are memoryviews of it.

The peer is not trusted (a worker runs model code): a frame count or size past the limits, or a
count of zero, raises StreamError, after which the stream cannot be read on (close it).
"""

from __future__ import annotations

import collections
import socket
import struct
from collections.abc import Sequence
from typing import Any

MAX_FRAMES = 1 << 16           # frames in one message (a batch of jobs, each a header + payload)
MAX_BYTES = 1 << 30            # bytes in one message, all frames together
_SMALL = 256 << 10             # messages up to this size are read through the shared read buffer
AHEAD = 64 << 20               # a large message's buffer grows as its bytes arrive, this far ahead
_IOV_MAX = 1000                # sendmsg's gather list is at most IOV_MAX (1024) buffers
_U32 = struct.Struct("<I")


class StreamError(Exception):
    """The peer broke the framing; the stream cannot be read on."""


def _view(frame: Any) -> memoryview:
    """A frame as bytes to send: bytes, a memoryview, anything with the buffer protocol, or a
    zmq.Frame (its ``buffer``)."""
    buf = getattr(frame, "buffer", frame)
    mv = buf if type(buf) is memoryview else memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def encode(frames: Sequence[Any]) -> list[memoryview]:
    """A message's buffers, ready for ``sendmsg``: its prefix, then the frames (not copied)."""
    views = [_view(f) for f in frames]
    if not 1 <= len(views) <= MAX_FRAMES:
        raise ValueError(f"a stream message has 1 to {MAX_FRAMES} frames, not {len(views)}")
    return [memoryview(struct.pack(f"<{len(views) + 1}I", len(views), *[v.nbytes for v in views])), *views]


def _advance(bufs: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``bufs`` once ``sent`` bytes of them went out."""
    i = 0
    while i < len(bufs) and sent >= bufs[i].nbytes:
        sent -= bufs[i].nbytes
        i += 1
    rest = bufs[i:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


def send_blocking(sock: socket.socket, frames: Sequence[Any]) -> None:
    """Send one message on a blocking socket (the worker's side), all of it."""
    bufs = encode(frames)
    while bufs:
        sent = sock.sendmsg(bufs[:_IOV_MAX])
        bufs = _advance(bufs, sent)


class Writer:
    """The agent's side of a stream: never blocks. What the socket does not take now waits here,
    in order, until ``flush`` (the caller polls for POLLOUT while ``pending``); ``waiting_bytes``
    says how much (a peer that does not read lets it grow: the caller bounds it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._queue: collections.deque[memoryview] = collections.deque()
        self.waiting_bytes = 0

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def send(self, frames: Sequence[Any]) -> bool:
        """Queue a message and write what the socket takes; True when nothing is left waiting.
        OSError when the peer is gone."""
        bufs = encode(frames)
        if self._queue:
            self._queue.extend(bufs)
            self.waiting_bytes += sum(b.nbytes for b in bufs)
            return False
        try:
            sent = self.sock.sendmsg(bufs[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        rest = _advance(bufs, sent)
        if rest:
            self._queue.extend(rest)
            self.waiting_bytes += sum(b.nbytes for b in rest)
            return False
        return True

    def flush(self) -> bool:
        """Write what waits, as much as the socket takes; True when nothing is left. OSError when
        the peer is gone."""
        while self._queue:
            bufs = [self._queue[i] for i in range(min(len(self._queue), _IOV_MAX))]
            try:
                sent = self.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                return False
            self.waiting_bytes -= sent
            while self._queue and sent >= self._queue[0].nbytes:
                sent -= self._queue.popleft().nbytes
            if sent:
                self._queue[0] = self._queue[0][sent:]
                return False
        return True


def _split(body: bytes | bytearray, lens: Sequence[int]) -> list[memoryview]:
    mv = memoryview(body)
    out, at = [], 0
    for n in lens:
        out.append(mv[at:at + n])
        at += n
    return out


class Reader:
    """Splits a stream into messages (lists of frames, memoryviews of one buffer per message).
    ``read`` does one ``recv`` and returns the messages it completed; on a non-blocking socket
    with nothing to read it returns none. EOFError when the peer closed; StreamError when it
    broke the framing or the limits."""

    def __init__(self, sock: socket.socket, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES,
                 *, first_alone: bool = False) -> None:
        self.sock = sock
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._first_alone = first_alone  # stop after the first message, until set_limits
        self._buf = bytearray(self._scratch_size())
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: tuple[bytearray, int, int, tuple[int, ...]] | None = None  # body, got, total, lens

    def _scratch_size(self) -> int:
        """The read buffer: any header within the limits, and small messages."""
        return 4 + 4 * self.max_frames + min(_SMALL, self.max_bytes)

    def set_limits(self, max_frames: int, max_bytes: int) -> list[list[memoryview]]:
        """New limits for the messages not read yet (a peer that proved who it is may send more
        than one that has not); the read buffer grows to fit them. Returns the messages already
        received behind the first (``first_alone``), read within the new limits."""
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._first_alone = False
        size = self._scratch_size()
        if size > len(self._buf):
            rest = bytes(self._view[self._start:self._end])
            self._view.release()
            self._buf = bytearray(size)
            self._buf[:len(rest)] = rest
            self._view = memoryview(self._buf)
            self._start, self._end = 0, len(rest)
        out: list[list[memoryview]] = []
        if self._big is None:
            self._parse(out)
        return out

    def read(self) -> list[list[memoryview]]:
        out: list[list[memoryview]] = []
        if self._big is not None:
            body, got, total, lens = self._big
            if got == len(body):  # grow with what arrives, never far ahead of it
                body.extend(bytes(min(total - got, max(got, AHEAD))))
            try:
                with memoryview(body) as mv:
                    k = self.sock.recv_into(mv[got:])
            except (BlockingIOError, InterruptedError):
                return out
            if k == 0:
                raise EOFError("the peer closed the stream")
            got += k
            if got < total:
                self._big = (body, got, total, lens)
            else:
                self._big = None
                out.append(_split(body, lens))
            return out
        if self._start == self._end:
            self._start = self._end = 0
        try:
            k = self.sock.recv_into(self._view[self._end:])
        except (BlockingIOError, InterruptedError):
            return out
        if k == 0:
            raise EOFError("the peer closed the stream")
        self._end += k
        self._parse(out)
        return out

    def _compact(self) -> None:
        n = self._end - self._start
        self._buf[:n] = self._view[self._start:self._end]
        self._start, self._end = 0, n

    def _parse(self, out: list[list[memoryview]]) -> None:
        buf = self._buf
        while True:
            have = self._end - self._start
            if have < 4:
                need = 4
                break
            n = _U32.unpack_from(buf, self._start)[0]
            if not 1 <= n <= self.max_frames:
                raise StreamError(f"a message of [{n}] frames; 1 to [{self.max_frames}] are taken")
            head = 4 + 4 * n
            if have < head:
                need = head
                break
            lens = struct.unpack_from(f"<{n}I", buf, self._start + 4)
            total = sum(lens)
            if total > self.max_bytes:
                raise StreamError(f"a message of [{total}] bytes; at most [{self.max_bytes}] are taken")
            at = self._start + head
            if have - head >= total:
                out.append(_split(bytes(self._view[at:at + total]), lens))
                self._start = at + total
                if self._first_alone:
                    return  # the rest waits for set_limits
                continue
            if head + total <= len(buf):  # fits the read buffer: wait for the rest there
                need = head + total
                break
            part = have - head             # a large message: read the rest straight into its own
            body = bytearray(min(total, max(part, AHEAD)))
            body[:part] = self._view[at:self._end]
            self._start = self._end = 0
            self._big = (body, part, total, lens)
            return
        if self._start + need > len(buf):  # the rest would not fit behind it: move it to the front
            self._compact()

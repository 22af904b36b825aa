"""Model chunk replies built with one copy and little time holding the GIL.

A ``model_chunk`` reply is ``encode_reply(rid, 200, {"data": bytes, "size": total})``. Built that
way (read the bytes, then msgpack them) a 4 MiB chunk is copied several times while the thread
holds the GIL; with many nodes fetching at once, the loop thread then waits for the GIL at every
step and heartbeats queue (a convoy). Here the frame is allocated once at its final size, the
envelope written around the data's place, and the file read straight into it with ``preadv``
(which runs without the GIL). The bytes are the same as ``encode_reply``'s (tested).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from mlfleet.common.errors import NotFound, ServerError
from mlfleet.common.protocol import encode_reply_raw, pack


def bin_header(n: int) -> bytes:
    """msgpack's header of a bin value of ``n`` bytes."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def chunk_reply(sha256: str, paths: Iterable[Path], rid: int, offset: int, length: int) -> bytearray:
    """The whole reply frame to a ``model_chunk`` request for up to ``length`` bytes from
    ``offset`` of model file or blob ``sha256``: the first of ``paths`` that exists.
    Blocking: run it on an Offload thread."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            n = max(0, min(length, size - offset))
            head = encode_reply_raw(rid, 200, b"") + b"\x82" + pack("data") + bin_header(n)
            tail = pack("size") + pack(size)
            frame = bytearray(len(head) + n + len(tail))
            view = memoryview(frame)
            view[:len(head)] = head
            got = 0
            while got < n:
                k = os.preadv(fd, [view[len(head) + got:len(head) + n]], offset + got)
                if k == 0:
                    raise ServerError(f"model file [{path.name}] is shorter than it was a moment ago")
                got += k
            view[len(head) + n:] = tail
            view.release()
            return frame
        finally:
            os.close(fd)
    raise NotFound(f"Could not find model definition [{sha256}]")

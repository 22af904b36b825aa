"""Model definitions cached on the agent's disk, named by sha256, fetched from the coordinator in
chunks with a bounded window of requests in flight and verified before use."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 << 20
WINDOW = 4


@dataclass
class Fetch:
    sha256: str
    tmp: Path
    size: int | None = None
    next_offset: int = 0
    in_flight: set[int] = field(default_factory=set)
    received: int = 0
    callbacks: list[Callable[[str | None, str | None], None]] = field(default_factory=list)


class ModelCache:
    def __init__(self, root: Path, request_chunk: Callable[[str, int, int, Callable], None]) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.part"):
            stale.unlink(missing_ok=True)
        self.request_chunk = request_chunk
        self.fetches: dict[str, Fetch] = {}

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def ensure(self, sha256: str, done: Callable[[str | None, str | None], None]) -> None:
        """Call ``done(path, None)`` once the file is here and verified, or ``done(None, error)``."""
        p = self.path(sha256)
        if p.exists():
            done(str(p), None)
            return
        f = self.fetches.get(sha256)
        if f is None:
            f = self.fetches[sha256] = Fetch(sha256, self.root / f"{sha256}.part")
            f.tmp.write_bytes(b"")
            log.info("fetching model definition %s from the coordinator", sha256)
            self._pump(f)
        f.callbacks.append(done)

    def _pump(self, f: Fetch) -> None:
        while len(f.in_flight) < WINDOW and (f.size is None and not f.in_flight or
                                             f.size is not None and f.next_offset < f.size):
            off = f.next_offset
            f.in_flight.add(off)
            f.next_offset += CHUNK_BYTES
            self.request_chunk(f.sha256, off, CHUNK_BYTES,
                               lambda status, body, off=off: self._on_chunk(f, off, status, body))

    def _on_chunk(self, f: Fetch, off: int, status: int, body: dict) -> None:
        if self.fetches.get(f.sha256) is not f:
            return
        f.in_flight.discard(off)
        if status != 200:
            reason = body.get("error", {}).get("reason", f"status {status}") if isinstance(body, dict) else str(body)
            self._finish(f, None, f"could not fetch model {f.sha256}: {reason}")
            return
        data, size = body.get("data", b""), int(body.get("size", 0))
        f.size = size
        with open(f.tmp, "r+b") as fh:
            fh.seek(off)
            fh.write(data)
        f.received += len(data)
        if f.received >= size and not f.in_flight:
            h = hashlib.sha256()
            with open(f.tmp, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != f.sha256:
                f.tmp.unlink(missing_ok=True)
                self._finish(f, None, f"model {f.sha256} failed verification (got {h.hexdigest()})")
                return
            os.replace(f.tmp, self.path(f.sha256))
            log.info("model definition %s cached (%d bytes)", f.sha256, size)
            self._finish(f, str(self.path(f.sha256)), None)
        else:
            self._pump(f)

    def _finish(self, f: Fetch, path: str | None, error: str | None) -> None:
        self.fetches.pop(f.sha256, None)
        for cb in f.callbacks:
            cb(path, error)

    def abort_all(self, reason: str) -> None:
        for f in list(self.fetches.values()):
            f.tmp.unlink(missing_ok=True)
            self._finish(f, None, reason)

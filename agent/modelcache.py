"""Model definitions cached on the agent's disk, named by sha256, fetched from the coordinator in
chunks with a bounded window of requests in flight and verified before use.

Everything here runs on the agent's loop thread except the blocking work (chunk writes, sha256,
fsync and rename, unlinking large files), which goes to an ``Offload`` pool; its results come
back on the loop. Received chunks are written at their offsets into ``<sha>.<n>.part`` (unique
per fetch, so a late write or unlink can never touch another fetch's file); when every byte is
there the file is hashed, fsynced and renamed to ``<sha>`` durably.

What the server calls, and when (all on the loop thread):

    cache = ModelCache(root, request_chunk, offload)      # at start
    cache.ensure(sha256, done)        # done(path, None) once here and verified, or done(None, reason)
    cache.on_reconnect()              # right after a reconnect to the coordinator dropped the
                                      # pending request callbacks: chunks in flight are asked again
    cache.tick(now)                   # every ~0.1-1 s with the loop's monotonic clock: chunk
                                      # timeouts and retries with backoff
    cache.prune(keep)                 # when assignments change: keep = every sha (model and
                                      # tokenizer) of every deployment on this node not yet stopped
    cache.abort_all(reason)           # at shutdown

``request_chunk(sha256, offset, length, callback)`` asks the coordinator for bytes; it calls
``callback(200, {"data": bytes, "size": total})`` or ``callback(status, {"error": {"type",
"reason"}, "status"})``, or never (a lost request: the chunk timeout covers it).

Guarantees: a fetch ends, with ``done`` called exactly once per ``ensure``. A chunk that fails
(a non-200 other than 400/403/404, or no answer within ``chunk_timeout_s``) is asked again after
a backoff, at most ``max_retries`` times, then the fetch fails naming the model, the offset and
the last error; 400/403/404 fail it at once (asking again cannot help). A full disk fails it
with ``no space left on device ...`` and its partial file is removed. A cached file is hashed
before its first use in this process; a corrupt one is removed and fetched again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlfleet.common.files import (
    DiskFullError,
    durable_replace,
    is_disk_full,
    sha256_file,
    temp_path,
    unlink_quiet,
    write_at,
)

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 << 20
WINDOW = 4
CHUNK_TIMEOUT_S = 30.0
MAX_RETRIES = 5
BACKOFF_S = 0.5
BACKOFF_MAX_S = 15.0
MAX_RESTARTS = 1  # a fetch whose bytes fail verification starts over this many times
PERMANENT = (400, 403, 404)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Done = Callable[[Optional[str], Optional[str]], None]
RequestChunk = Callable[[str, int, int, Callable[[int, dict], None]], None]

# chunk states
SENT, BACKOFF, QUEUED, WRITING = "sent", "backoff", "queued", "writing"
# fetch phases
CHECKING, FETCHING, VERIFYING, PLACING, ENDED = "checking", "fetching", "verifying", "placing", "ended"


class _Inline:
    """Runs work at once on the calling thread: only for a caller that passes no Offload
    (older wiring, tests); a daemon passes its Offload so nothing blocks its loop."""

    def submit(self, fn: Callable[..., Any], *args: Any,
               done: Callable[[Any, Optional[BaseException]], None]) -> None:
        try:
            result, error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - handed to the callback like Offload does
            result, error = None, e
        done(result, error)


@dataclass
class _Chunk:
    offset: int
    state: str = QUEUED
    attempts: int = 0         # failures so far
    token: int = 0            # the request whose answer is awaited
    deadline: float = 0.0     # this attempt times out then (kept across reconnects)
    retry_at: float = 0.0
    resend: bool = False      # asked again after a reconnect: same attempt, same deadline
    last_error: str = ""


@dataclass
class Fetch:
    sha256: str
    callbacks: list[Done] = field(default_factory=list)
    phase: str = CHECKING
    part: Optional[Path] = None
    size: Optional[int] = None
    next_offset: int = 0                                    # first offset never asked for
    chunks: dict[int, _Chunk] = field(default_factory=dict)  # asked for, not yet written
    queue: list[int] = field(default_factory=list)          # heap of offsets to ask (again)
    received: int = 0                                       # bytes written to the part file
    restarts: int = 0

    def active(self) -> int:
        return sum(1 for c in self.chunks.values() if c.state in (SENT, WRITING))


class ModelCache:
    def __init__(self, root: Path, request_chunk: RequestChunk, offload: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, chunk_bytes: int = CHUNK_BYTES,
                 window: int = WINDOW, chunk_timeout_s: float = CHUNK_TIMEOUT_S,
                 max_retries: int = MAX_RETRIES, backoff_s: float = BACKOFF_S,
                 backoff_max_s: float = BACKOFF_MAX_S, max_restarts: int = MAX_RESTARTS) -> None:
        """``offload``: the daemon's ``mlfleet.common.offload.Offload`` (its fd polled by the
        loop); without one, blocking work runs inline. ``clock``: the monotonic clock used
        between ticks (for deadlines set when a chunk is sent or fails)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.request_chunk = request_chunk
        self.offload = offload if offload is not None else _Inline()
        self.clock = clock
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_restarts = max_restarts
        self.fetches: dict[str, Fetch] = {}
        self.verified: set[str] = set()  # shas whose cached file was hashed in this process
        self._tokens = itertools.count(1)
        self._parts = itertools.count(1)
        for stale in list(self.root.glob("*.part")) + list(self.root.glob("*.trash")):
            self._discard(stale)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    # ---- the public contract -------------------------------------------------------------------
    def ensure(self, sha256: str, done: Done) -> None:
        """Call ``done(path, None)`` once the file is here and verified, or ``done(None, error)``.
        May call ``done`` before returning (a file already verified in this process)."""
        if not _SHA_RE.match(sha256 or ""):
            done(None, f"invalid model sha256 [{sha256}]")
            return
        p = self.path(sha256)
        if sha256 in self.verified and sha256 not in self.fetches:
            if p.exists():
                done(str(p), None)
                return
            self.verified.discard(sha256)
        f = self.fetches.get(sha256)
        if f is not None:
            f.callbacks.append(done)
            return
        f = self.fetches[sha256] = Fetch(sha256, [done])
        if p.exists():
            f.phase = CHECKING
            self.offload.submit(sha256_file, p, done=lambda r, e: self._on_cached_hash(f, r, e))
        else:
            self._start_download(f)

    def on_reconnect(self) -> None:
        """The connection to the coordinator was replaced and the answers to requests in flight
        will never come: ask for those chunks again (the part file keeps what was received).
        A re-ask costs no retry, but keeps its attempt's deadline, so a coordinator that never
        answers still fails the fetch after the bounded retries."""
        for f in list(self.fetches.values()):
            if f.phase != FETCHING:
                continue
            for c in f.chunks.values():
                if c.state == SENT:
                    c.state, c.resend = QUEUED, True
                    heapq.heappush(f.queue, c.offset)
            self._pump(f)

    def tick(self, now: float | None = None) -> None:
        """Time out unanswered chunks and send the ones whose backoff ended. Call it
        periodically from the loop (every 0.1-1 s)."""
        now = self.clock() if now is None else now
        for f in list(self.fetches.values()):
            if f.phase != FETCHING:
                continue
            for c in list(f.chunks.values()):
                if f.phase != FETCHING:
                    break
                if c.state == SENT and now >= c.deadline:
                    self._chunk_failed(f, c, f"no answer in {self.chunk_timeout_s:g}s", now)
                elif c.state == BACKOFF and now >= c.retry_at:
                    c.state = QUEUED
                    heapq.heappush(f.queue, c.offset)
            self._pump(f, now)

    def prune(self, keep: set[str]) -> list[str]:
        """Remove cached files whose sha is not in ``keep`` and no fetch wants, and part files
        of no fetch. ``keep`` must hold every sha a deployment on this node may still load.
        Returns the names removed (their unlinking finishes on the Offload pool)."""
        parts = {f.part.name for f in self.fetches.values() if f.part is not None}
        removed = []
        for p in self.root.iterdir():
            name = p.name
            if _SHA_RE.match(name):
                if name in keep or name in self.fetches:
                    continue
                self.verified.discard(name)
            elif not name.endswith(".part") or name in parts:
                continue
            removed.append(name)
            self._discard(p)
        if removed:
            log.info("model cache: removed %d file(s) no deployment uses: %s", len(removed),
                     ", ".join(removed))
        return removed

    def abort_all(self, reason: str) -> None:
        """Fail every fetch with ``reason`` (shutdown)."""
        for f in list(self.fetches.values()):
            self._fail(f, reason)

    def progress(self) -> dict[str, dict[str, Any]]:
        """For logs and stats: ``{sha: {"phase", "received", "size"}}`` of fetches under way."""
        return {s: {"phase": f.phase, "received": f.received, "size": f.size}
                for s, f in self.fetches.items()}

    # ---- cached files --------------------------------------------------------------------------
    def _on_cached_hash(self, f: Fetch, got: str | None, error: BaseException | None) -> None:
        if self.fetches.get(f.sha256) is not f or f.phase != CHECKING:
            return
        if error is None and got == f.sha256:
            self.verified.add(f.sha256)
            self._end(f, str(self.path(f.sha256)), None)
            return
        why = f"unreadable ({error})" if error is not None else f"corrupt (its sha256 is {got})"
        log.warning("cached model definition %s is %s; removing it and fetching it again", f.sha256, why)
        self._discard(self.path(f.sha256))
        self._start_download(f)

    # ---- fetching ------------------------------------------------------------------------------
    def _start_download(self, f: Fetch) -> None:
        f.phase = FETCHING
        f.part = self.root / f"{f.sha256}.{os.getpid()}-{next(self._parts)}.part"
        f.size, f.next_offset, f.received = None, 0, 0
        f.chunks, f.queue = {}, []
        try:
            f.part.touch(exist_ok=False)
        except OSError as e:
            self._fail(f, self._disk_reason(f, e, "creating"))
            return
        log.info("fetching model definition %s from the coordinator", f.sha256)
        self._pump(f)

    def _pump(self, f: Fetch, now: float | None = None) -> None:
        if f.phase != FETCHING or self.fetches.get(f.sha256) is not f:
            return
        now = self.clock() if now is None else now
        while f.phase == FETCHING and f.active() < self.window:
            if f.queue:
                c = f.chunks[heapq.heappop(f.queue)]
            elif f.size is None:
                if f.chunks:  # the first chunk tells the size; ask for more after it
                    return
                c = f.chunks[0] = _Chunk(0)
                f.next_offset = self.chunk_bytes
            elif f.next_offset < f.size:
                c = f.chunks[f.next_offset] = _Chunk(f.next_offset)
                f.next_offset += self.chunk_bytes
            else:
                return
            self._send(f, c, now)

    def _send(self, f: Fetch, c: _Chunk, now: float) -> None:
        if not c.resend:  # a re-ask after a reconnect keeps its attempt's deadline
            c.deadline = now + self.chunk_timeout_s
        c.resend = False
        c.state, c.token = SENT, next(self._tokens)
        token = c.token
        try:
            self.request_chunk(f.sha256, c.offset, self.chunk_bytes,
                               lambda status, body: self._on_reply(f, c.offset, token, status, body))
        except Exception as e:  # noqa: BLE001 - a send that failed is a failed attempt
            if c.state == SENT and c.token == token:
                self._chunk_failed(f, c, f"could not send the request: {e}", now)

    def _on_reply(self, f: Fetch, off: int, token: int, status: int, body: Any) -> None:
        c = f.chunks.get(off)
        if (self.fetches.get(f.sha256) is not f or f.phase != FETCHING or c is None
                or c.state != SENT or c.token != token):
            return  # an answer to a request given up on (timed out, reconnected, fetch ended)
        if status != 200:
            reason = _reason(status, body)
            if status in PERMANENT:
                self._fail(f, f"could not fetch model {f.sha256}: {reason}")
            else:
                self._chunk_failed(f, c, reason)
            return
        try:
            data, size = body["data"], int(body["size"])
            if not isinstance(data, (bytes, bytearray, memoryview)) or size < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            self._chunk_failed(f, c, "malformed answer")
            return
        if f.size is None:
            f.size = size
            free = self._free_bytes()
            if free is not None and free < size:
                self._fail(f, f"no space left on device for model {f.sha256}: it needs {size} bytes, "
                              f"{free} are free under {self.root}")
                return
        elif size != f.size:
            self._restart_or_fail(f, f"its size changed from {f.size} to {size} during the fetch")
            return
        expected = max(0, min(self.chunk_bytes, f.size - off))
        if len(data) != expected:
            self._chunk_failed(f, c, f"got {len(data)} bytes at offset {off}, expected {expected}")
            return
        c.state = WRITING
        self.offload.submit(write_at, f.part, off, bytes(data),
                            done=lambda n, e: self._on_written(f, c, token, n, e))
        self._pump(f)

    def _on_written(self, f: Fetch, c: _Chunk, token: int, n: int | None,
                    error: BaseException | None) -> None:
        if (self.fetches.get(f.sha256) is not f or f.phase != FETCHING or f.chunks.get(c.offset) is not c
                or c.state != WRITING or c.token != token):
            return  # a write of a download that ended or started over
        if error is not None:
            self._fail(f, self._disk_reason(f, error, "writing"))
            return
        del f.chunks[c.offset]
        f.received += n or 0
        if f.size is not None and f.next_offset >= f.size and not f.chunks and not f.queue:
            f.phase = VERIFYING
            self.offload.submit(sha256_file, f.part, done=lambda r, e: self._on_hashed(f, r, e))
        else:
            self._pump(f)

    def _on_hashed(self, f: Fetch, got: str | None, error: BaseException | None) -> None:
        if self.fetches.get(f.sha256) is not f or f.phase != VERIFYING:
            return
        if error is not None:
            self._fail(f, self._disk_reason(f, error, "reading"))
            return
        if got != f.sha256:
            self._restart_or_fail(f, f"its bytes failed verification (got sha256 {got})")
            return
        f.phase = PLACING
        self.offload.submit(durable_replace, f.part, self.path(f.sha256),
                            done=lambda r, e: self._on_placed(f, e))

    def _on_placed(self, f: Fetch, error: BaseException | None) -> None:
        if self.fetches.get(f.sha256) is not f or f.phase != PLACING:
            return
        if error is not None:
            self._fail(f, self._disk_reason(f, error, "storing"))
            return
        f.part = None
        self.verified.add(f.sha256)
        log.info("model definition %s cached (%d bytes)", f.sha256, f.size or 0)
        self._end(f, str(self.path(f.sha256)), None)

    # ---- failures ------------------------------------------------------------------------------
    def _chunk_failed(self, f: Fetch, c: _Chunk, reason: str, now: float | None = None) -> None:
        c.attempts += 1
        c.last_error = reason
        if c.attempts > self.max_retries:
            self._fail(f, f"could not fetch model {f.sha256}: the chunk at offset {c.offset} failed "
                          f"{c.attempts} times; last error: {reason}")
            return
        now = self.clock() if now is None else now
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (c.attempts - 1))
        c.state, c.retry_at, c.token = BACKOFF, now + delay, 0
        log.info("model %s: chunk at offset %d failed (%s); asking again in %.1fs (try %d of %d)",
                 f.sha256, c.offset, reason, delay, c.attempts + 1, self.max_retries + 1)

    def _restart_or_fail(self, f: Fetch, why: str) -> None:
        if f.restarts >= self.max_restarts:
            self._fail(f, f"could not fetch model {f.sha256}: {why}")
            return
        f.restarts += 1
        log.warning("model %s: %s; fetching it again from the start", f.sha256, why)
        if f.part is not None:
            self._discard(f.part)
        self._start_download(f)

    def _disk_reason(self, f: Fetch, error: BaseException, action: str) -> str:
        if isinstance(error, DiskFullError):
            return f"could not fetch model {f.sha256}: {error}"
        if is_disk_full(error):
            return f"could not fetch model {f.sha256}: no space left on device {action} {f.part}: {error}"
        return f"could not fetch model {f.sha256}: error {action} {f.part}: {error}"

    def _fail(self, f: Fetch, reason: str) -> None:
        if f.phase == ENDED:
            return
        log.warning("%s", reason)
        if f.part is not None:
            self._discard(f.part)
            f.part = None
        self._end(f, None, reason)

    def _end(self, f: Fetch, path: str | None, error: str | None) -> None:
        f.phase = ENDED
        if self.fetches.get(f.sha256) is f:
            del self.fetches[f.sha256]
        callbacks, f.callbacks = f.callbacks, []
        for cb in callbacks:
            try:
                cb(path, error)
            except Exception:
                log.exception("model cache callback failed")

    # ---- files ---------------------------------------------------------------------------------
    def _discard(self, p: Path) -> None:
        """Remove a file without blocking the loop on a large unlink: renamed aside at once
        (so the name is free and no reader finds it), unlinked on the pool."""
        trash = p if p.name.endswith(".trash") else temp_path(p, ".trash")
        try:
            if trash != p:
                os.replace(p, trash)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("could not remove %s: %s", p, e)
            return
        self.offload.submit(unlink_quiet, trash, done=lambda r, e: e and log.warning(
            "could not remove %s: %s", trash, e))

    def _free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None


def _reason(status: int, body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("reason"):
            return f"[{status}] {err['reason']}"
    return f"status {status}"

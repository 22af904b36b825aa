"""Blocking work off the event loop.

The daemons are single-threaded poll loops: a sha256 over a large model, a large file read or
write, or a model load would stall every heartbeat and inference relay behind it. ``Offload``
runs such work on a small thread pool and hands each result back to the loop thread through a
pipe the loop polls, so callbacks always run on the loop, one at a time, like any other event.

    off = Offload()
    poller.register(off.fd, zmq.POLLIN)
    off.submit(sha256_file, path, done=lambda result, error: ...)
    ...
    if off.fd in events:
        off.run_done()

A callback that raises is logged and the loop goes on.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Optional

log = logging.getLogger(__name__)

Done = Callable[[Any, Optional[BaseException]], None]


class Offload:
    def __init__(self, workers: int = 2, name: str = "mlfleet-offload") -> None:
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._done: collections.deque[tuple[Done, Any, Optional[BaseException]]] = collections.deque()
        self._lock = threading.Lock()
        self.pending = 0
        self.closed = False

    @property
    def fd(self) -> int:
        """Readable when results wait for ``run_done``."""
        return self._r

    def submit(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run ``fn(*args)`` on a pool thread; ``done(result, None)`` or ``done(None, error)``
        runs later on the loop thread, from ``run_done``."""
        self.pending += 1

        def work() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 - handed to the loop, never lost
                result, error = None, e
            self._done.append((done, result, error))
            try:
                os.write(self._w, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (the loop will drain it) or closed (shutting down)

        self._pool.submit(work)

    def run_done(self) -> int:
        """Call the callbacks of finished work; returns how many ran."""
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        n = 0
        while self._done:
            done, result, error = self._done.popleft()
            self.pending -= 1
            n += 1
            try:
                done(result, error)
            except Exception:
                log.exception("offloaded work's callback %s failed", getattr(done, "__name__", done))
        return n

    def wait_idle(self, timeout_s: float) -> bool:
        """For shutdown and tests: wait until no work is pending (running callbacks as they come)."""
        import select
        import time
        deadline = time.monotonic() + timeout_s
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._r], [], [], left)
            self.run_done()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

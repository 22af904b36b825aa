"""The agent's model cache, driven in-process: a fake coordinator whose answers the test hands
out (or loses), a real Offload for the blocking work, and a fake clock for timeouts. Fetches
finish or fail with a reason; reconnects resume them; cached files are verified before use."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from mlfleet.agent import modelcache
from mlfleet.agent.modelcache import ModelCache
from mlfleet.common.offload import Offload

pytestmark = pytest.mark.timeout(60)
CHUNK = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCoordinator:
    """Serves blobs by sha; requests wait in ``pending`` until the test answers or drops them."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.pending: list[tuple[str, int, int, object]] = []
        self.asked: list[int] = []
        self.fail_with: tuple[int, dict] | None = None

    def request_chunk(self, sha, offset, length, cb) -> None:
        self.asked.append(offset)
        self.pending.append((sha, offset, length, cb))

    def answer(self, n: int | None = None) -> int:
        """Answer the first ``n`` pending requests (all by default)."""
        todo = self.pending if n is None else self.pending[:n]
        self.pending = [] if n is None else self.pending[n:]
        for sha, off, length, cb in todo:
            if self.fail_with is not None:
                cb(*self.fail_with)
            elif sha not in self.blobs:
                cb(404, {"error": {"type": "resource_not_found_exception",
                                   "reason": f"Could not find model definition [{sha}]"}, "status": 404})
            else:
                data = self.blobs[sha]
                cb(200, {"data": data[off:off + length], "size": len(data)})
        return len(todo)

    def drop(self) -> None:
        """A reconnect: the agent's pending callbacks are cleared, these answers never come."""
        self.pending = []


class Harness:
    def __init__(self, root: Path, blobs: dict[str, bytes], **kw) -> None:
        self.off = Offload(2)
        self.clock = Clock()
        self.coord = FakeCoordinator(blobs)
        self.cache = ModelCache(root, self.coord.request_chunk, self.off, clock=self.clock,
                                chunk_bytes=CHUNK, window=3, **kw)
        self.results: list[tuple[str | None, str | None]] = []

    def ensure(self, sha: str) -> None:
        self.cache.ensure(sha, lambda p, e: self.results.append((p, e)))

    def settle(self) -> None:
        assert self.off.wait_idle(10)

    def start(self, sha: str) -> None:
        """ensure, and answer the first chunk: the fetch knows the size and has a window out."""
        self.ensure(sha)
        self.coord.answer()
        self.settle()

    def run(self, max_rounds: int = 1000) -> None:
        """Answer and settle until nothing is asked any more."""
        for _ in range(max_rounds):
            self.settle()
            if not self.coord.answer():
                self.settle()
                if not self.coord.pending:
                    return
        raise AssertionError("the fetch never settled")

    def close(self) -> None:
        self.settle()
        self.off.close()


def _blob(n: int = 10 * CHUNK + 123, seed: int = 1) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1)
    data = data[:n]
    return hashlib.sha256(data).hexdigest(), data


@pytest.fixture
def make(tmp_path):
    made: list[Harness] = []

    def make_(blobs: dict[str, bytes], root: Path | None = None, **kw) -> Harness:
        h = Harness(root or tmp_path / "cache", blobs, **kw)
        made.append(h)
        return h
    yield make_
    for h in made:
        h.close()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".part", ".trash")))


def test_a_fetch_writes_verifies_and_places_the_file(make, tmp_path):
    sha, data = _blob()
    h = make({sha: data})
    h.ensure(sha)
    h.ensure(sha)  # a second deployment of the same model joins the same fetch
    assert len(h.coord.pending) == 1, "the first chunk tells the size"
    h.coord.answer()
    h.settle()
    assert 1 <= len(h.coord.pending) <= 3, "a bounded window of chunks in flight"
    h.run()
    path = str(tmp_path / "cache" / sha)
    assert h.results == [(path, None), (path, None)]
    assert Path(path).read_bytes() == data
    assert sorted(h.coord.asked) == list(range(0, len(data), CHUNK))
    assert _leftovers(tmp_path / "cache") == []
    assert h.cache.fetches == {}


def test_an_interrupted_fetch_resumes_after_a_reconnect(make, tmp_path):
    sha, data = _blob()
    h = make({sha: data})
    h.start(sha)
    h.coord.answer(1)  # one more chunk arrives, then the connection goes
    h.settle()
    received = set(h.coord.asked) - {off for _, off, _, _ in h.coord.pending}
    h.coord.drop()
    h.settle()
    assert h.results == [] and h.cache.fetches[sha].received == len(received) * CHUNK
    asked_before = len(h.coord.asked)
    h.cache.on_reconnect()
    h.settle()
    assert h.coord.pending, "the chunks in flight are asked for again"
    h.run()
    assert h.results == [(str(tmp_path / "cache" / sha), None)]
    assert (tmp_path / "cache" / sha).read_bytes() == data
    again = h.coord.asked[asked_before:]
    assert not set(again) & received, "what was received is not fetched again"
    assert sorted(set(h.coord.asked)) == list(range(0, len(data), CHUNK))
    assert _leftovers(tmp_path / "cache") == []


def test_a_lost_answer_is_asked_for_again_after_the_chunk_timeout(make, tmp_path):
    sha, data = _blob(3 * CHUNK)
    h = make({sha: data}, chunk_timeout_s=30)
    h.start(sha)
    h.coord.drop()  # lost without a reconnect (e.g. the coordinator restarted quietly)
    h.cache.tick(h.clock.now + 29)
    assert not h.coord.pending
    h.clock.now += 31
    h.cache.tick()
    h.clock.now += 1  # past the backoff
    h.cache.tick()
    assert h.coord.pending, "the unanswered chunks are asked for again"
    h.run()
    assert h.results == [(str(tmp_path / "cache" / sha), None)]


def test_a_coordinator_that_never_answers_fails_the_fetch_despite_reconnects(make, tmp_path):
    sha, data = _blob(3 * CHUNK)
    h = make({sha: data}, chunk_timeout_s=30, max_retries=2, backoff_s=1)
    h.ensure(sha)
    for _ in range(40):  # reconnect every 10 s, as the agent does when it hears nothing
        h.clock.now += 10
        h.coord.drop()
        h.cache.on_reconnect()
        h.cache.tick()
        h.settle()
        if h.results:
            break
    assert len(h.results) == 1 and h.results[0][0] is None
    err = h.results[0][1]
    assert sha in err and "3 times" in err and "no answer in 30s" in err
    assert _leftovers(tmp_path / "cache") == []


def test_chunk_errors_are_retried_with_backoff_then_fail_with_a_reason(make, tmp_path):
    sha, data = _blob(3 * CHUNK)
    h = make({sha: data}, max_retries=3, backoff_s=1, backoff_max_s=4)
    h.coord.fail_with = (503, {"error": {"type": "status_exception", "reason": "coordinator busy"},
                               "status": 503})
    h.ensure(sha)
    tries = 0
    while not h.results:
        tries += h.coord.answer()
        h.settle()
        h.cache.tick(h.clock.now + 0.5)
        assert not h.coord.pending, "not asked again before the backoff"
        h.clock.now += 4
        h.cache.tick()
        assert tries < 10
    assert tries == 4
    (path, err), = h.results
    assert path is None
    assert err == (f"could not fetch model {sha}: the chunk at offset 0 failed 4 times; "
                   "last error: [503] coordinator busy")
    assert _leftovers(tmp_path / "cache") == []


def test_a_failing_chunk_that_recovers_finishes_the_fetch(make, tmp_path):
    sha, data = _blob()
    h = make({sha: data}, max_retries=3, backoff_s=1)
    h.start(sha)
    h.coord.fail_with = (500, {"error": {"type": "status_exception", "reason": "boom"}, "status": 500})
    h.coord.answer(1)
    h.coord.fail_with = None
    h.clock.now += 1
    h.cache.tick()
    h.run()
    assert h.results == [(str(tmp_path / "cache" / sha), None)]
    assert (tmp_path / "cache" / sha).read_bytes() == data


def test_an_unknown_model_fails_at_once(make):
    h = make({})
    h.ensure("f" * 64)
    h.run()
    (path, err), = h.results
    assert path is None and "f" * 64 in err and "Could not find model definition" in err
    assert h.coord.asked == [0]


def test_a_corrupt_cached_file_is_detected_and_fetched_again(make, tmp_path, monkeypatch):
    sha, data = _blob()
    root = tmp_path / "cache"
    root.mkdir()
    (root / sha).write_bytes(data[:-1] + b"X")  # e.g. a disk error or a torn write
    h = make({sha: data})
    h.ensure(sha)
    h.run()
    assert h.results == [(str(root / sha), None)]
    assert (root / sha).read_bytes() == data
    assert h.coord.asked
    # verified once in this process: later uses neither hash nor fetch it again
    hashed = []
    monkeypatch.setattr(modelcache, "sha256_file", lambda p: hashed.append(p) or "x")
    asked = len(h.coord.asked)
    h.ensure(sha)
    assert h.results[-1] == (str(root / sha), None) and not hashed and len(h.coord.asked) == asked


def test_a_good_cached_file_is_verified_before_first_use_without_a_fetch(make, tmp_path, monkeypatch):
    sha, data = _blob()
    root = tmp_path / "cache"
    root.mkdir()
    (root / sha).write_bytes(data)
    (root / f"{sha}.999-1.part").write_bytes(b"from a previous run")
    h = make({sha: data})
    h.ensure(sha)
    assert h.results == [], "hashing happens on the pool, not in ensure"
    h.run()
    assert h.results == [(str(root / sha), None)] and h.coord.asked == []
    assert _leftovers(root) == []


def test_bytes_that_fail_verification_are_fetched_once_more_then_fail(make, tmp_path):
    sha, data = _blob()
    h = make({sha: data[:-1] + b"?"})  # the coordinator serves wrong bytes under that name
    h.ensure(sha)
    h.run()
    (path, err), = h.results
    assert path is None and sha in err and "failed verification" in err
    assert h.coord.asked.count(0) == 2, "fetched from the start once more before failing"
    assert not (tmp_path / "cache" / sha).exists() and _leftovers(tmp_path / "cache") == []


def test_a_full_disk_fails_the_fetch_clearly_and_removes_the_partial_file(make, tmp_path, monkeypatch):
    sha, data = _blob()
    h = make({sha: data})
    real = modelcache.write_at
    writes = []

    def write_at(path, off, chunk):
        writes.append(off)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, off, chunk)
    monkeypatch.setattr(modelcache, "write_at", write_at)
    h.ensure(sha)
    h.run()
    (path, err), = h.results
    assert path is None
    assert err.startswith(f"could not fetch model {sha}: no space left on device writing ")
    h.settle()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk(make, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        big_sha, big = _blob(2 << 20, seed=2)
        sha, data = _blob(600 << 10, seed=3)
        h = make({big_sha: big, sha: data}, root=mnt / "cache")
        h.cache.chunk_bytes = 64 << 10
        h.ensure(big_sha)  # larger than the disk: refused as soon as its size is known
        h.run()
        (path, err), = h.results
        assert path is None and err.startswith(f"no space left on device for model {big_sha}: it needs")
        h.start(sha)  # fits when it starts, then something else fills the disk
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        h.run()
        path, err = h.results[1]
        assert path is None and f"could not fetch model {sha}: no space left on device writing" in err
        h.settle()
        assert sorted(p.name for p in (mnt / "cache").iterdir()) == []
        h.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_prune_removes_unused_files_and_stale_parts_but_not_active_fetches(make, tmp_path):
    a, da = _blob(seed=4)
    b, db = _blob(seed=5)
    c, dc = _blob(seed=6)
    h = make({a: da, b: db, c: dc})
    for sha in (a, b):
        h.ensure(sha)
    h.run()
    root = tmp_path / "cache"
    (root / f"{c}.1-1.part").write_bytes(b"stale")
    h.start(c)  # under way: its part file and its sha survive the prune
    removed = h.cache.prune({a})
    h.settle()
    assert sorted(removed) == sorted([b, f"{c}.1-1.part"])
    assert (root / a).exists() and not (root / b).exists()
    assert b not in h.cache.verified
    h.run()
    assert (root / c).read_bytes() == dc
    h.ensure(b)  # wanted again: fetched again
    h.run()
    assert h.results[-1] == (str(root / b), None) and (root / b).read_bytes() == db
    assert _leftovers(root) == []


def test_abort_all_fails_fetches_and_removes_their_parts(make, tmp_path):
    sha, data = _blob()
    h = make({sha: data})
    h.start(sha)
    h.cache.abort_all("agent shutting down")
    h.run()  # late answers are ignored
    assert h.results == [(None, "agent shutting down")]
    h.settle()
    assert list((tmp_path / "cache").iterdir()) == []


def test_without_an_offload_it_still_works_inline(tmp_path):
    sha, data = _blob()
    coord = FakeCoordinator({sha: data})
    cache = ModelCache(tmp_path / "cache", coord.request_chunk, chunk_bytes=CHUNK)
    results = []
    cache.ensure(sha, lambda p, e: results.append((p, e)))
    while coord.answer():
        pass
    assert results == [(str(tmp_path / "cache" / sha), None)]

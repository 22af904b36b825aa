"""Memory bounded in bytes, not counts: the inference cache accounts what it really holds, and the
throughput window takes constant memory at any rate (pure tests, fake clock)."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pytest

from mlfleet.agent.cache import LruCache
from mlfleet.agent.runtime import Stats

pytestmark = pytest.mark.timeout(60)


def test_cache_accounting_covers_what_it_really_holds():
    cache = LruCache(8 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # small results: where overhead dominates
            key = hashlib.blake2b(str(i).encode(), digest_size=20).digest()
            cache.put(key, os.urandom(24))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 20_000
    assert cache.used >= held, (cache.used, held)       # never under-counted
    assert cache.used <= 1.5 * held, (cache.used, held)  # and not wildly over


def test_cache_never_holds_more_than_its_capacity():
    cache = LruCache(64 << 10)
    for i in range(5_000):
        cache.put(i.to_bytes(20, "big"), os.urandom(i % 300))
        assert cache.used <= cache.capacity
    assert sum(LruCache.cost(v) for v, _ in cache._items.values()) == cache.used
    cache.put(b"k" * 20, os.urandom(70 << 10))  # larger than the whole cache: not kept
    assert b"k" * 20 not in cache._items


def test_cache_is_lru():
    cache = LruCache(3 * LruCache.cost(b"x" * 10))
    for k in (b"a", b"b", b"c"):
        cache.put(k, b"x" * 10)
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", b"x" * 10)
    assert cache.get(b"b") is None and cache.get(b"a") is not None


def test_throughput_window_is_constant_memory_and_exact():
    s = Stats(start_time_ms=0)
    t = 1000.0
    for i in range(200_000):  # 200k documents over 100 seconds
        s.record(t + i * 0.0005, 0, 1, 1.0, hit=False)
    now = t + 200_000 * 0.0005
    assert len(s.buckets) == 60
    assert s.last_minute(now) == pytest.approx(120_000, abs=2_001)  # the last 60 s of 2,000/s
    assert s.peak_per_minute >= s.last_minute(now)
    assert s.last_minute(now + 61) == 0  # a quiet minute later, nothing left
    assert s.peak_per_minute >= 118_000


def test_throughput_window_after_a_long_gap():
    s = Stats(start_time_ms=0)
    s.record(10.2, 0, 5, 1.0, hit=True)
    s.record(10.7, 0, 5, 1.0, hit=False)
    assert s.last_minute(11.0) == 10
    s.record(10_000.0, 0, 1, 1.0, hit=False)
    assert s.last_minute(10_000.5) == 1

"""A deployment's counters on one node, as Elasticsearch reports them (``agent/core.py`` keeps one
per deployment; the shell reads it through ``DeploymentCore.report``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Stats:
    """Counts documents (inferences), as Elasticsearch does; cache hits count as inferences.
    The last minute's throughput is kept in 60 one-second buckets: constant memory at any rate."""
    start_time_ms: int
    inference_count: int = 0
    error_count: int = 0
    timeout_count: int = 0
    rejected_execution_count: int = 0
    cache_hit_count: int = 0
    total_time_ms: float = 0.0
    compute_time_ms: float = 0.0
    queue_time_ms: float = 0.0
    batches: int = 0
    batched_jobs: int = 0
    computed_jobs: int = 0
    last_access_ms: Optional[int] = None
    peak_per_minute: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * 60)  # docs per second, by second % 60
    bucket_second: int = 0  # the last second written

    def _advance(self, now: float) -> None:
        second = int(now)
        gap = second - self.bucket_second
        if gap > 0:
            for k in range(1, min(gap, 60) + 1):
                self.buckets[(self.bucket_second + k) % 60] = 0
            self.bucket_second = second

    def record(self, now: float, wall_ms: int, docs: int, time_ms: float, hit: bool) -> None:
        self.inference_count += docs
        self.total_time_ms += time_ms
        if hit:
            self.cache_hit_count += docs
        else:
            self.compute_time_ms += time_ms
        self.last_access_ms = wall_ms
        self._advance(now)
        self.buckets[int(now) % 60] += docs

    def last_minute(self, now: float) -> int:
        self._advance(now)
        n = sum(self.buckets)
        self.peak_per_minute = max(self.peak_per_minute, n)
        return n

"""A monotonic clock behind a small interface, so pure logic can be driven by a fake in tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds, as Elasticsearch writes start_time."""
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"

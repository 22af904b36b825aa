"""A monotonic clock behind a small interface, so pure logic can be driven by a fake in tests."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_ISO_MS = -62_135_596_800_000  # 0001-01-01T00:00:00.000Z
MAX_ISO_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds, as Elasticsearch writes start_time. Total: an instant before
    year 1 or after year 9999 is written as the first or last one ISO-8601 can hold."""
    ms = min(max(int(epoch_ms), MIN_ISO_MS), MAX_ISO_MS)
    dt = EPOCH + timedelta(milliseconds=ms)
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}."
            f"{ms % 1000:03d}Z")

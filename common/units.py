"""Elasticsearch-style time values ("500ms", "30s", "1m") and byte values ("10kb", binary units)."""

from __future__ import annotations

import math
import re

_TIME_UNITS = {"nanos": 1e-9, "micros": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}
_TIME_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|pb)?\s*$", re.IGNORECASE)


def parse_time(value: str | int | float, name: str = "timeout") -> float:
    """Seconds from a time value. Raises ValueError naming the setting when it cannot be read or
    is not finite (``1e400s``, NaN: no caller can wait that long or compute a deadline from it)."""
    if isinstance(value, bool):
        raise ValueError(f"failed to parse setting [{name}] with value [{value}] as a time value")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int past a float's range
            seconds = math.inf
    else:
        m = _TIME_RE.match(str(value))
        if not m:
            raise ValueError(f"failed to parse setting [{name}] with value [{str(value)[:80]}] as a time "
                             "value: unit is missing or unrecognized")
        seconds = float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
    if not math.isfinite(seconds):
        # worded as params' own check of a non-finite value (the coordinator's answers keep it)
        raise ValueError(f"failed to parse setting [{name}] with value [{str(value)[:80]}] as a time value")
    return seconds


def format_time(seconds: float) -> str:
    """A compact time value: whole units where they fit ("30s", "1m", "500ms")."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_bytes(value: str | int, name: str = "cache_size") -> int:
    """Bytes from a byte value; units are binary (1kb = 1024 bytes), as in Elasticsearch."""
    if isinstance(value, bool):
        raise ValueError(f"failed to parse setting [{name}] with value [{value}] as a size in bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"failed to parse setting [{name}] with value [{value}] as a size in bytes")
        return value
    m = _BYTES_RE.match(str(value))
    if not m:
        raise ValueError(f"failed to parse setting [{name}] with value [{value}] as a size in bytes: "
                         "unit is missing or unrecognized")
    unit = (m.group(2) or "b").lower()
    return int(float(m.group(1)) * _BYTE_UNITS[unit])


def normalize_bytes(value: str | int, name: str = "cache_size") -> str:
    """The string form a byte value is echoed in ("10kb" stays "10kb"; 1630 -> "1630b")."""
    parse_bytes(value, name)
    if isinstance(value, int):
        return f"{value}b"
    return str(value).strip().lower().replace(" ", "")

"""Parameter rules for start and update, after Elasticsearch's, as pure functions.

Every broken rule is collected and reported at once as ``Validation Failed: 1: ...;2: ...;``.

Beyond Elasticsearch's rules, every value is bounded so that nothing downstream can overflow or
wait forever (``common.messages`` has already checked types, ids, lengths and finiteness of what
came over the wire; these functions check again what they need, for callers in code):

* ``number_of_allocations`` and the adaptive bounds: at most ``MAX_NUMBER_OF_ALLOCATIONS``;
* ``timeout``: a finite time value, > 0 and at most ``MAX_TIMEOUT`` (7 days: a start waits at
  most that long for ``wait_for``);
* ``max_batch_delay``: a finite time value from 0 to 1s;
* ``cache_size``: at most ``MAX_CACHE_SIZE`` (1pb).

A non-finite time value (NaN, an infinity, or digits that overflow a double) is reported as
Elasticsearch reports an unreadable one: ``failed to parse setting [X] with value [V] as a time
value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

from mlfleet.common.errors import ValidationError
from mlfleet.common.messages import MAX_MEMORY_BYTES, MAX_NUMBER_OF_ALLOCATIONS, StartDeployment, id_problem
from mlfleet.common.units import normalize_bytes, parse_bytes, parse_time

__all__ = ["Adaptive", "StartParams", "id_problem", "validate_start", "validate_update",
           "wait_for_reached"]

PRIORITIES = ("normal", "low")
WAIT_FOR = ("starting", "started", "fully_allocated")  # in order of progress
MAX_QUEUE_CAPACITY = 1_000_000
MAX_THREADS = 32
MAX_BATCH_SIZE = 1024
MAX_BATCH_DELAY_S = 1.0
MAX_TIMEOUT_S = 7 * 86_400.0
MAX_TIMEOUT = "7d"
MAX_CACHE_SIZE = MAX_MEMORY_BYTES
MAX_ALLOCATIONS_SAFEGUARD = 32  # adaptive allocations without a max


def _time(value: Any, name: str, errors: list[str]) -> Optional[float]:
    """Seconds from a time value, or None (the problem appended) if it cannot be read or is not
    finite."""
    try:
        seconds = parse_time(value, name)
    except (ValueError, OverflowError) as e:
        errors.append(str(e))
        return None
    if not math.isfinite(seconds):
        errors.append(f"failed to parse setting [{name}] with value [{str(value)[:80]}] as a time value")
        return None
    return seconds


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Adaptive:
    enabled: bool = False
    min_number_of_allocations: Optional[int] = None
    max_number_of_allocations: Optional[int] = None

    def to_body(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "min_number_of_allocations": self.min_number_of_allocations,
                "max_number_of_allocations": self.max_number_of_allocations}


@dataclass(frozen=True)
class StartParams:
    model_id: str
    deployment_id: str
    number_of_allocations: int
    threads_per_allocation: int
    queue_capacity: int
    priority: str
    cache_size: Optional[str]  # None: the model's size
    timeout_s: float
    wait_for: str
    adaptive: Optional[Adaptive]
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0


def _adaptive_problems(raw: Any, errors: list[str]) -> Optional[Adaptive]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.append("[adaptive_allocations] must be an object")
        return None
    unknown = sorted(set(raw) - {"enabled", "min_number_of_allocations", "max_number_of_allocations"})
    if unknown:
        errors.append(f"[adaptive_allocations] does not support [{', '.join(map(str, unknown))}]")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        errors.append("[enabled] must be a boolean")
        enabled = False
    lo, hi = raw.get("min_number_of_allocations"), raw.get("max_number_of_allocations")
    ok = True
    if lo is not None and (not _is_int(lo) or lo < 0):
        errors.append("[min_number_of_allocations] must be a non-negative integer or null")
        ok = False
    elif lo is not None and lo > MAX_NUMBER_OF_ALLOCATIONS:
        errors.append("[min_number_of_allocations] must be less than or equal to "
                      f"{MAX_NUMBER_OF_ALLOCATIONS}")
        ok = False
    if hi is not None and (not _is_int(hi) or hi < 1):
        errors.append("[max_number_of_allocations] must be a positive integer or null")
        ok = False
    elif hi is not None and hi > MAX_NUMBER_OF_ALLOCATIONS:
        errors.append("[max_number_of_allocations] must be less than or equal to "
                      f"{MAX_NUMBER_OF_ALLOCATIONS}")
        ok = False
    if ok and lo is not None and hi is not None and lo > hi:
        errors.append("[min_number_of_allocations] must not be larger than [max_number_of_allocations]")
    return Adaptive(enabled, lo if ok else None, hi if ok else None)


def _allocations_problems(n: Any, errors: list[str]) -> None:
    if n is None:
        return
    if not _is_int(n) or n < 1:
        errors.append("[number_of_allocations] must be a positive integer")
    elif n > MAX_NUMBER_OF_ALLOCATIONS:
        errors.append(f"[number_of_allocations] must be less than or equal to {MAX_NUMBER_OF_ALLOCATIONS}")


def validate_start(msg: StartDeployment) -> StartParams:
    errors: list[str] = []
    for name, value in (("model_id", msg.model_id), ("deployment_id", msg.deployment_id)):
        if value is not None and (p := id_problem(name, value)):
            errors.append(p)
    adaptive = _adaptive_problems(msg.adaptive_allocations, errors)
    n = msg.number_of_allocations
    _allocations_problems(n, errors)
    if n is not None and adaptive is not None and adaptive.enabled:
        errors.append("[number_of_allocations] cannot be set if adaptive allocations is enabled")
    t = msg.threads_per_allocation
    if t < 1:
        errors.append("[threads_per_allocation] must be a positive integer")
    if t > MAX_THREADS or t & (t - 1) != 0 or t == 0:
        errors.append(f"[threads_per_allocation] must be a power of 2 less than or equal to {MAX_THREADS}")
    q = msg.queue_capacity
    if q < 1:
        errors.append("[queue_capacity] must be a positive integer")
    if q > MAX_QUEUE_CAPACITY:
        errors.append(f"[queue_capacity] must be less than or equal to {MAX_QUEUE_CAPACITY}")
    timeout_s = _time(msg.timeout, "timeout", errors)
    if timeout_s is not None and timeout_s <= 0:
        errors.append("[timeout] must be positive")
    elif timeout_s is not None and timeout_s > MAX_TIMEOUT_S:
        errors.append(f"[timeout] must be less than or equal to {MAX_TIMEOUT}")
    if msg.priority not in PRIORITIES:
        errors.append(f"invalid [priority] [{msg.priority}]; must be one of [normal,low]")
    if msg.priority == "low":
        if n is not None and n != 1:
            errors.append("[number_of_allocations] must be 1 when [priority] is low")
        if t != 1:
            errors.append("[threads_per_allocation] must be 1 when [priority] is low")
    if msg.wait_for not in WAIT_FOR:
        errors.append(f"invalid [wait_for] state [{msg.wait_for}]; must be one of "
                      "[started,starting,fully_allocated]")
    b = msg.max_batch_size
    if b < 1:
        errors.append("[max_batch_size] must be a positive integer")
    if b > MAX_BATCH_SIZE:
        errors.append(f"[max_batch_size] must be less than or equal to {MAX_BATCH_SIZE}")
    delay_s = _time(msg.max_batch_delay, "max_batch_delay", errors)
    if delay_s is not None and delay_s < 0:
        errors.append("[max_batch_delay] must not be negative")
    if delay_s is not None and delay_s > MAX_BATCH_DELAY_S:
        errors.append("[max_batch_delay] must be less than or equal to 1s")
    cache = None
    if msg.cache_size is not None:
        try:
            size = parse_bytes(msg.cache_size, "cache_size")
        except ValueError as e:
            errors.append(str(e))
        except OverflowError:  # more digits than a double holds
            errors.append(f"failed to parse setting [cache_size] with value [{str(msg.cache_size)[:80]}] "
                          "as a size in bytes")
        else:
            if size > MAX_CACHE_SIZE:
                errors.append("[cache_size] must be less than or equal to 1pb")
            else:
                cache = normalize_bytes(msg.cache_size, "cache_size")
    if errors or timeout_s is None or delay_s is None:
        raise ValidationError(errors)
    if n is None:
        lo = adaptive.min_number_of_allocations if adaptive and adaptive.enabled else None
        n = lo if lo else 1
    return StartParams(model_id=msg.model_id, deployment_id=msg.deployment_id or msg.model_id,
                       number_of_allocations=n, threads_per_allocation=t, queue_capacity=q,
                       priority=msg.priority, cache_size=cache, timeout_s=timeout_s,
                       wait_for=msg.wait_for, adaptive=adaptive, max_batch_size=b,
                       max_batch_delay_ms=delay_s * 1000.0)


def validate_update(number_of_allocations: Optional[int], adaptive_raw: Any,
                    current: Optional[Adaptive]) -> tuple[Optional[int], Optional[Adaptive]]:
    """Validate an update and merge its adaptive settings into the current ones, field by field
    (Elasticsearch: a field left out keeps its value). Returns (allocations, merged adaptive)."""
    errors: list[str] = []
    _allocations_problems(number_of_allocations, errors)
    merged = current
    if adaptive_raw is not None:
        given = _adaptive_problems(adaptive_raw, errors)
        if given is not None and isinstance(adaptive_raw, dict):
            base = current or Adaptive()
            changes = {k: getattr(given, k) for k in ("enabled", "min_number_of_allocations",
                                                      "max_number_of_allocations") if k in adaptive_raw}
            merged = replace(base, **changes)
            lo, hi = merged.min_number_of_allocations, merged.max_number_of_allocations
            if lo is not None and hi is not None and lo > hi and not any("larger" in e for e in errors):
                errors.append("[min_number_of_allocations] must not be larger than "
                              "[max_number_of_allocations]")
    if number_of_allocations is not None and merged is not None and merged.enabled:
        errors.append("[number_of_allocations] cannot be set if adaptive allocations is enabled")
    if errors:
        raise ValidationError(errors)
    return number_of_allocations, merged


def wait_for_reached(wait_for: str, state: str) -> bool:
    """allocation_status.state (starting < started < fully_allocated) has reached wait_for."""
    return WAIT_FOR.index(state) >= WAIT_FOR.index(wait_for)


def low_priority_rules(number_of_allocations: Optional[int], adaptive: Optional[Adaptive]) -> None:
    """A low-priority deployment is one allocation of one thread, through start, update and
    adaptive allocations (which may scale it to zero and back to one, no further)."""
    errors = []
    if number_of_allocations is not None and number_of_allocations != 1:
        errors.append("[number_of_allocations] must be 1 when [priority] is low")
    if adaptive is not None and adaptive.enabled:
        if (adaptive.min_number_of_allocations or 0) > 1:
            errors.append("[min_number_of_allocations] must be 0 or 1 when [priority] is low")
        if adaptive.max_number_of_allocations not in (None, 1):
            errors.append("[max_number_of_allocations] must be 1 when [priority] is low")
    if errors:
        raise ValidationError(errors)

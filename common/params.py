"""Parameter rules for start and update, after Elasticsearch's, as pure functions.

Every broken rule is collected and reported at once as ``Validation Failed: 1: ...;2: ...;``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Optional

from mlfleet.common.errors import ValidationError
from mlfleet.common.messages import StartDeployment
from mlfleet.common.units import normalize_bytes, parse_time

PRIORITIES = ("normal", "low")
WAIT_FOR = ("starting", "started", "fully_allocated")  # in order of progress
MAX_QUEUE_CAPACITY = 1_000_000
MAX_THREADS = 32
MAX_BATCH_SIZE = 1024
MAX_BATCH_DELAY_S = 1.0
MAX_ALLOCATIONS_SAFEGUARD = 32  # adaptive allocations without a max
_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_\-.]{0,62}[a-z0-9])?$")


def id_problem(name: str, value: str) -> str | None:
    if _ID_RE.match(value):
        return None
    return (f"Invalid [{name}]; [{value[:80]}] can contain lowercase alphanumeric (a-z and 0-9), "
            "hyphens, periods or underscores; must start and end with alphanumeric and be at most "
            "64 characters")


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
    if lo is not None and (not isinstance(lo, int) or isinstance(lo, bool) or lo < 0):
        errors.append("[min_number_of_allocations] must be a non-negative integer or null")
        ok = False
    if hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < 1):
        errors.append("[max_number_of_allocations] must be a positive integer or null")
        ok = False
    if ok and lo is not None and hi is not None and lo > hi:
        errors.append("[min_number_of_allocations] must not be larger than [max_number_of_allocations]")
    return Adaptive(enabled, lo if ok else None, hi if ok else None)


def validate_start(msg: StartDeployment) -> StartParams:
    errors: list[str] = []
    for name, value in (("model_id", msg.model_id), ("deployment_id", msg.deployment_id)):
        if value is not None and (p := id_problem(name, value)):
            errors.append(p)
    adaptive = _adaptive_problems(msg.adaptive_allocations, errors)
    n = msg.number_of_allocations
    if n is not None and n < 1:
        errors.append("[number_of_allocations] must be a positive integer")
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
    timeout_s = 30.0
    try:
        timeout_s = parse_time(msg.timeout, "timeout")
        if timeout_s <= 0:
            errors.append("[timeout] must be positive")
    except ValueError as e:
        errors.append(str(e))
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
    delay_s = 0.0
    try:
        delay_s = parse_time(msg.max_batch_delay, "max_batch_delay")
        if delay_s < 0:
            errors.append("[max_batch_delay] must not be negative")
        if delay_s > MAX_BATCH_DELAY_S:
            errors.append("[max_batch_delay] must be less than or equal to 1s")
    except ValueError as e:
        errors.append(str(e))
    cache = None
    if msg.cache_size is not None:
        try:
            cache = normalize_bytes(msg.cache_size, "cache_size")
        except ValueError as e:
            errors.append(str(e))
    if errors:
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
    if number_of_allocations is not None and number_of_allocations < 1:
        errors.append("[number_of_allocations] must be a positive integer")
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

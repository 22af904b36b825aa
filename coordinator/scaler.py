"""Adaptive allocations, after Elasticsearch's ``AdaptiveAllocationsScaler``: a pure function of
the stats it is fed and the time that passed. No clock, no I/O.

Two 1-D Kalman filters smooth the request rate and the inference time. The load, in busy
allocations, is rate x time; with 1-sigma bounds on both:

* scale up while ``load_lower / n > 0.9``;
* scale down while ``n > 1`` and ``load_upper / (n - 1) < 0.85`` (the gap between the two
  thresholds, and using the pessimistic bound for each direction, keeps steady load from
  oscillating);
* clamp to max (32 when there is none), then min;
* with min 0 (or none), scale to zero after ``scale_to_zero_after_s`` without requests.

Both directions are computed in closed form, capped at the maximum first: the load comes from
agents' reports, so one report must not cost a loop per allocation. A load that is not finite, or
above ``ABSURD_LOAD``, keeps the current number.

The caller applies the cooldown (no scale-down within ``scale_up_cooldown`` of a scale-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SCALE_UP_THRESHOLD = 0.9
SCALE_DOWN_THRESHOLD = 0.85
MAX_ALLOCATIONS_SAFEGUARD = 32
# A load (busy allocations) no deployment can have: 10**4 times the most allocations a deployment
# may ask for (common.messages.MAX_NUMBER_OF_ALLOCATIONS). Above it an agent's report is wrong, and
# the scaler keeps the current number rather than follow it.
ABSURD_LOAD = 1e9


@dataclass
class KalmanFilter1d:
    smoothing: float = 100.0
    auto_detect_dynamics_change: bool = False
    value: Optional[float] = None
    variance: float = math.inf
    _changed_last: bool = False

    def add(self, x: float, variance: float, dynamics_changed: bool = False) -> None:
        if self.value is None or math.isinf(self.variance):
            self.value, self.variance = x, variance
            return
        if self.auto_detect_dynamics_change and (x - self.value) ** 2 / (variance + self.variance) > 100:
            dynamics_changed = True
        process_variance = variance / self.smoothing
        if dynamics_changed or self._changed_last:
            process_variance = x * x  # forget the past quickly after a jump
        self._changed_last = dynamics_changed
        gain = (self.variance + process_variance) / (self.variance + process_variance + variance)
        self.value += gain * (x - self.value)
        self.variance = (1 - gain) * (self.variance + process_variance)

    @property
    def has_value(self) -> bool:
        return self.value is not None

    def _estimate(self) -> float:
        if self.value is None:
            raise ValueError("the filter has no value yet: add() one first")
        return self.value

    def lower(self) -> float:
        return self._estimate() - math.sqrt(self.variance)

    def upper(self) -> float:
        return self._estimate() + math.sqrt(self.variance)


@dataclass(frozen=True)
class Sample:
    """What one tick saw, summed over nodes: inferences finished, requests still pending, failed
    requests, and the mean inference time of the finished ones (seconds; None if none finished)."""
    success: int
    pending: int
    failed: int
    inference_time_s: Optional[float]


@dataclass
class Scaler:
    allocations: int
    min_allocations: Optional[int] = None
    max_allocations: Optional[int] = None
    scale_to_zero_after_s: float = 900.0
    rate: KalmanFilter1d = field(default_factory=lambda: KalmanFilter1d(100.0, True))
    time: KalmanFilter1d = field(default_factory=lambda: KalmanFilter1d(100.0, False))
    idle_s: float = 0.0
    _allocations_changed: bool = False

    def observe(self, s: Sample, dt_s: float) -> None:
        if dt_s <= 0:
            return
        count = s.success + s.pending + s.failed
        r = count / dt_s
        est = self.rate.value if self.rate.value is not None else r
        self.rate.add(r, max(1.0, est * dt_s) / (dt_s * dt_s))
        if s.success > 0 and s.inference_time_s is not None and not math.isnan(s.inference_time_s):
            t_est = self.time.value if self.time.value is not None else s.inference_time_s
            self.time.add(s.inference_time_s, max(t_est * t_est, 1e-12) / s.success,
                          self._allocations_changed)
            self._allocations_changed = False
        self.idle_s = 0.0 if count > 0 else self.idle_s + dt_s

    def set_allocations(self, n: int) -> None:
        if n != self.allocations:
            self._allocations_changed = True
            self.allocations = n

    def request_arrived(self) -> None:
        """A request is waiting for an allocation (scale from zero): not idle."""
        self.idle_s = 0.0

    def load_bounds(self) -> tuple[float, float]:
        t_lo = max(0.0, self.time.lower()) if self.time.has_value else 1.0
        t_hi = self.time.upper() if self.time.has_value else 1.0
        return max(0.0, self.rate.lower()) * t_lo, self.rate.upper() * t_hi

    def needed(self) -> Optional[int]:
        """The allocations to have now, or None to keep the current number.

        Closed form of the rule (no loop over allocations: the load comes from agents' reports,
        up to 2**63 pending requests of 1e15 ms, and this runs on the coordinator's event loop).
        A load that is not finite, or above ``ABSURD_LOAD``, keeps the current number.
        """
        if not self.rate.has_value:
            return None
        load_lo, load_hi = self.load_bounds()
        if not (math.isfinite(load_lo) and math.isfinite(load_hi)) or load_lo > ABSURD_LOAD:
            return None
        cap = self.max_allocations if self.max_allocations is not None else MAX_ALLOCATIONS_SAFEGUARD
        n = self.allocations
        if n == 0:
            n = 1 if load_lo > 0 else 0
        if n > 0 and load_lo / n > SCALE_UP_THRESHOLD:
            # the fewest allocations with load_lo / n <= the threshold, capped first
            n = max(n, _fewest(load_lo, SCALE_UP_THRESHOLD))
        elif n > 1 and load_hi / (n - 1) < SCALE_DOWN_THRESHOLD:
            # down to the most allocations with load_hi / (n - 1) >= the threshold (or to one)
            n = min(n, _most(load_hi, SCALE_DOWN_THRESHOLD))
        n = min(n, cap)
        lo = self.min_allocations or 0
        n = max(n, lo, 1 if self.allocations > 0 else 0)
        if lo == 0 and self.idle_s > self.scale_to_zero_after_s:
            n = 0
        return n if n != self.allocations else None


def _fewest(load: float, threshold: float) -> int:
    """The fewest allocations k >= 1 with ``load / k <= threshold``. ``load`` is finite and at most
    ``ABSURD_LOAD``: the float estimate is at most one off, the two steps correct it."""
    k = max(1, math.ceil(load / threshold))
    while k > 1 and load / (k - 1) <= threshold:
        k -= 1
    while load / k > threshold:
        k += 1
    return k


def _most(load: float, threshold: float) -> int:
    """The most allocations k >= 1 with ``k == 1 or load / (k - 1) >= threshold``; ``load`` is finite
    and below ``threshold`` times the current allocations."""
    k = max(1, math.floor(load / threshold) + 1)
    while k > 1 and load / (k - 1) < threshold:
        k -= 1
    while load / k >= threshold:
        k += 1
    return k

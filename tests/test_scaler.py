"""The adaptive allocations scaler, a pure function fed with sequences of stats."""

from __future__ import annotations

import math

import pytest

from mlfleet.coordinator.scaler import KalmanFilter1d, Sample, Scaler

pytestmark = pytest.mark.timeout(30)
DT = 10.0


def load(rate_per_s: float, time_s: float, dt: float = DT) -> Sample:
    n = int(round(rate_per_s * dt))
    return Sample(success=n, pending=0, failed=0, inference_time_s=time_s if n else None)


def run(s: Scaler, samples, apply: bool = True) -> list[int]:
    seen = []
    for sample in samples:
        s.observe(sample, DT)
        n = s.needed()
        if n is not None and apply:
            s.set_allocations(n)
        seen.append(s.allocations)
    return seen


def test_kalman_filter_converges_and_tracks_a_jump():
    f = KalmanFilter1d(smoothing=100, auto_detect_dynamics_change=True)
    for _ in range(50):
        f.add(10.0, 1.0)
    assert f.value == pytest.approx(10.0, abs=0.05)
    assert f.lower() < 10.0 < f.upper()
    for _ in range(3):
        f.add(50.0, 1.0)  # a 40-sigma jump: dynamics changed, the estimate follows quickly
    assert f.value == pytest.approx(50.0, abs=1.0)


def test_steady_load_scales_up_once_and_does_not_oscillate():
    s = Scaler(allocations=1, max_allocations=8)
    seen = run(s, [load(20.0, 0.1)] * 60)  # 2 busy allocations
    assert seen[-1] in (3, 4)
    assert len(set(seen[20:])) == 1, f"oscillates under steady load: {seen}"


def test_more_load_more_allocations_then_back_down():
    s = Scaler(allocations=1, max_allocations=16)
    up = run(s, [load(50.0, 0.1)] * 30)  # 5 busy allocations
    assert up[-1] >= 6
    down = run(s, [load(5.0, 0.1)] * 60)  # 0.5 busy
    assert down[-1] == 1


def test_no_max_is_capped_at_32_and_max_and_min_clamp():
    s = Scaler(allocations=1)
    assert run(s, [load(1000.0, 0.1)] * 20)[-1] == 32
    s = Scaler(allocations=1, max_allocations=3)
    assert run(s, [load(1000.0, 0.1)] * 20)[-1] == 3
    s = Scaler(allocations=4, min_allocations=2, max_allocations=6)
    assert run(s, [load(0.1, 0.01)] * 30)[-1] == 2


def test_scale_to_zero_after_idle_only_when_min_allows():
    s = Scaler(allocations=2, min_allocations=0, scale_to_zero_after_s=60.0)
    seen = run(s, [load(0.0, 0.0)] * 5)
    assert seen[-1] == 1  # idle 50 s: down to 1, not yet zero
    seen = run(s, [load(0.0, 0.0)] * 3)
    assert seen[-1] == 0
    assert s.needed() is None  # stays at zero while idle
    s.request_arrived()
    assert s.idle_s == 0.0

    s = Scaler(allocations=2, min_allocations=1, scale_to_zero_after_s=60.0)
    assert run(s, [load(0.0, 0.0)] * 20)[-1] == 1


def test_from_zero_load_asks_for_allocations():
    s = Scaler(allocations=0, min_allocations=0, max_allocations=4)
    assert run(s, [load(30.0, 0.1)] * 10)[-1] >= 3


def test_no_decision_before_any_sample():
    assert Scaler(allocations=1).needed() is None
    s = Scaler(allocations=1)
    s.observe(load(1.0, 0.1), 0.0)  # no time passed: ignored
    assert s.needed() is None
    assert math.isinf(s.rate.variance)


def _loop_needed(allocations: int, load_lo: float, load_hi: float, cap: int) -> int:
    """The scaler's rule as first written, one allocation at a time: the reference for sane loads."""
    n = allocations
    if n == 0:
        n = 1 if load_lo > 0 else 0
    while n > 0 and load_lo / n > 0.9:
        n += 1
    while n > 1 and load_hi / (n - 1) < 0.85:
        n -= 1
    return max(min(n, cap), 1 if allocations > 0 else 0)


def _fixed(allocations: int, lo: float, hi: float, max_allocations=None) -> Scaler:
    s = Scaler(allocations=allocations, max_allocations=max_allocations)
    s.load_bounds = lambda: (lo, hi)  # type: ignore[method-assign]
    s.rate.add(1.0, 1.0)
    return s


def test_the_closed_form_decides_as_the_one_by_one_rule_for_sane_loads():
    loads = [0.0, 0.05, 0.5, 0.85, 0.9, 0.9000001, 1.0, 1.7, 1.8, 2.7, 3.6, 4.5, 7.65, 10.0, 27.0, 28.8,
             31.5, 100.0, 1000.0, 12345.6]
    for allocations in (0, 1, 2, 3, 5, 8, 32, 40):
        for cap in (1, 4, 32, 100_000):
            for lo in loads:
                for hi in (lo, lo * 1.2, lo + 0.5, lo * 3):
                    s = _fixed(allocations, lo, hi, cap)
                    want = _loop_needed(allocations, lo, hi, cap)
                    got = s.needed()
                    assert (allocations if got is None else got) == want, (allocations, cap, lo, hi)


@pytest.mark.parametrize("pending,time_s", [
    (10**9, None), (2**62, None), (2**63 - 1, None), (2**63 - 1, 1e12), (10**9, 1e12), (0, 1e12),
])
@pytest.mark.timeout(30)  # counting up to 2**62 one by one (as before) never ends
def test_an_absurd_report_is_decided_at_once(pending, time_s):
    # An agent may report up to 2**63-1 pending requests and 1e15 ms per inference: one tick must
    # still decide in well under a second (it runs on the coordinator's event loop).
    for max_allocations in (None, 4, 100_000):
        s = Scaler(allocations=1, max_allocations=max_allocations)
        run(s, [load(1.0, 0.1)] * 3)
        cur = s.allocations
        success = 2**63 - 1 if time_s is not None else 0
        s.observe(Sample(success=success, pending=pending, failed=0, inference_time_s=time_s), DT)
        n = s.needed()
        top = max_allocations if max_allocations is not None else 32
        assert n is None or cur <= n <= top


def test_a_non_finite_or_absurd_load_keeps_the_current_number():
    for lo, hi in [(math.nan, 1.0), (1.0, math.nan), (math.inf, math.inf), (0.0, math.inf),
                   (1e18, 1e18), (4.6e17, 5e17)]:
        for allocations in (0, 1, 3):
            assert _fixed(allocations, lo, hi, 8).needed() is None, (lo, hi, allocations)
    assert _fixed(1, 1e6, 1e6, 8).needed() == 8  # a huge but possible load: the maximum

"""Adaptive allocations as a component: built from named dependencies (fakes here, no sockets,
no store), driven with a fake clock."""

from __future__ import annotations

import pytest

from mlfleet.common.params import Adaptive
from mlfleet.coordinator.adaptive import AdaptiveAllocations
from mlfleet.coordinator.state import DeploymentRecord, NodeRecord, Route, RouteReport, RoutingState
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(30)


def _world(allocations: int, adaptive: Adaptive, priority: str = "normal"):
    clock = FakeClock()
    dep = DeploymentRecord("d", "m", allocations, 1, 1024, priority, None, adaptive, 0,
                           targets={"n1": allocations} if allocations else {})
    node = NodeRecord("n1", "h", "tcp://x:1", 8, {}, {}, 1, 0.0)
    calls: list[tuple[str, int, str]] = []

    def set_allocations(d: DeploymentRecord, n: int, why: str) -> None:
        calls.append((d.deployment_id, n, why))
        d.number_of_allocations = n
        d.targets = {"n1": n} if n else {}

    def routes(d: DeploymentRecord) -> list[Route]:
        n = d.targets.get("n1", 0)
        return [Route("n1", RoutingState.STARTED, n, n, "")] if n else []

    comp = AdaptiveAllocations(clock=clock, scale_to_zero_after_s=60.0, scale_up_cooldown_s=300.0,
                               deployments={"d": dep}, alive=lambda: [node], routes=routes,
                               set_allocations=set_allocations, push_sync=lambda n: None,
                               save=lambda d: None)
    return clock, dep, node, comp, calls


def _report(node: NodeRecord, count: int, pending: int, avg_ms: float) -> None:
    node.reports["d"] = RouteReport(RoutingState.STARTED, 1, 1, "", {
        "inference_count": count, "number_of_pending_requests": pending,
        "average_inference_time_ms": avg_ms})


def test_a_request_at_zero_starts_one_allocation():
    _, dep, _, comp, calls = _world(0, Adaptive(True, 0, 4))
    comp.request_at_zero(dep)
    assert calls == [("d", 1, "scale from zero")]
    comp.request_at_zero(dep)  # no longer at zero: nothing more
    assert len(calls) == 1


def test_load_scales_up_and_the_cooldown_holds_it_there():
    clock, dep, node, comp, calls = _world(1, Adaptive(True, 1, 4))
    count = 0
    comp.tick()  # baseline
    for _ in range(12):  # 10 s ticks, 40 requests/s of 100 ms each: 4 busy allocations
        clock.t += 10
        count += 400
        _report(node, count, 10, 100.0)
        comp.tick()
    assert dep.number_of_allocations >= 3, calls
    top = dep.number_of_allocations
    for _ in range(5):  # idle, but within the 5 minute cooldown: no scale down
        clock.t += 10
        _report(node, count, 0, 100.0)
        comp.tick()
    assert dep.number_of_allocations == top


def test_low_priority_never_scales_past_one():
    clock, dep, node, comp, calls = _world(1, Adaptive(True, 0, None), priority="low")
    count = 0
    comp.tick()
    for _ in range(12):
        clock.t += 10
        count += 400
        _report(node, count, 10, 100.0)
        comp.tick()
    assert dep.number_of_allocations == 1 and all(n <= 1 for _, n, _ in calls)


@pytest.mark.parametrize("count,pending,avg_ms", [
    (0, 2**62, 0.0), (0, 2**63 - 1, 0.0), (2**63 - 1, 2**63 - 1, 1e15), (2**63 - 1, 0, 1e15),
])
@pytest.mark.timeout(30)  # counting up to 2**62 one by one (as before) never ends
def test_a_report_of_absurd_load_is_decided_at_once(count, pending, avg_ms):
    # the largest values the stats shape lets an agent send: one tick decides within a second
    clock, dep, node, comp, calls = _world(1, Adaptive(True, 1, 4))
    comp.tick()
    for i in range(1, 4):
        clock.t += 10
        _report(node, 10 * i, 0, 100.0)
        comp.tick()
    clock.t += 10
    _report(node, count, pending, avg_ms)
    comp.tick()
    assert 1 <= dep.number_of_allocations <= 4

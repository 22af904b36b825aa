"""Adaptive allocations: the scaler's tick, scale to zero with warm nodes, and scale from zero
for requests that find no allocation. A component of the coordinator with named dependencies:
it reads deployments and node reports and changes allocations only through the callables it is
given, so it can be built and driven without sockets or a store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from mlfleet.common.clock import Clock
from mlfleet.common.errors import TooManyRequests
from mlfleet.coordinator.scaler import Sample, Scaler
from mlfleet.coordinator.state import DeploymentRecord, NodeRecord, Route

log = logging.getLogger(__name__)


@dataclass
class _Track:
    scaler: Scaler
    last: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # node -> (count, total_ms, failed)
    last_tick: Optional[float] = None
    last_scale_up: float = float("-inf")
    failure_logged: Optional[int] = None


class AdaptiveAllocations:
    def __init__(self, *, clock: Clock, scale_to_zero_after_s: float, scale_up_cooldown_s: float,
                 deployments: dict[str, DeploymentRecord],
                 alive: Callable[[], list[NodeRecord]],
                 routes: Callable[[DeploymentRecord], list[Route]],
                 set_allocations: Callable[[DeploymentRecord, int, str], None],
                 push_sync: Callable[[str], None],
                 save: Callable[[DeploymentRecord], None]) -> None:
        self.clock = clock
        self.scale_to_zero_after_s = scale_to_zero_after_s
        self.scale_up_cooldown_s = scale_up_cooldown_s
        self.deployments = deployments
        self._alive = alive
        self._routes = routes
        self._set_allocations = set_allocations
        self._push_sync = push_sync
        self._save = save
        self.tracks: dict[str, _Track] = {}

    def _track(self, dep: DeploymentRecord) -> _Track:
        a = dep.adaptive
        t = self.tracks.get(dep.deployment_id)
        if t is None:
            t = self.tracks[dep.deployment_id] = _Track(Scaler(
                dep.number_of_allocations, scale_to_zero_after_s=self.scale_to_zero_after_s))
        t.scaler.min_allocations = a.min_number_of_allocations if a else None
        t.scaler.max_allocations = a.max_number_of_allocations if a else None
        if dep.priority == "low":  # one allocation of one thread, or zero
            t.scaler.max_allocations = 1
        t.scaler.set_allocations(dep.number_of_allocations)
        return t

    def _sample(self, dep: DeploymentRecord, t: _Track) -> Sample:
        success = pending = failed = 0
        time_ms = 0.0
        seen = {}
        for node in self._alive():
            rep = node.reports.get(dep.deployment_id)
            if rep is None:
                continue
            s = rep.stats
            count = int(s.get("inference_count", 0))
            total = float(s.get("average_inference_time_ms", 0.0)) * count
            bad = int(s.get("error_count", 0)) + int(s.get("timeout_count", 0)) + int(
                s.get("rejected_execution_count", 0))
            c0, t0, b0 = t.last.get(node.node_id, (0, 0.0, 0))
            if count < c0:  # the node restarted the deployment: its counters began again
                c0, t0, b0 = 0, 0.0, 0
            success += count - c0
            time_ms += total - t0
            failed += max(0, bad - b0)
            pending += int(s.get("number_of_pending_requests", 0))
            seen[node.node_id] = (count, total, bad)
        t.last = seen
        return Sample(success, pending, failed, (time_ms / success / 1000.0) if success else None)

    def tick(self) -> None:
        """Every --adaptive-interval: observe each adaptive deployment's load, scale it."""
        now = self.clock.monotonic()
        for dep in list(self.deployments.values()):
            if dep.stopping or not (dep.adaptive and dep.adaptive.enabled):
                self.tracks.pop(dep.deployment_id, None)
                continue
            t = self._track(dep)
            sample = self._sample(dep, t)
            if t.last_tick is None:  # the first tick only records the baseline
                t.last_tick = now
                continue
            t.scaler.observe(sample, now - t.last_tick)
            t.last_tick = now
            n = t.scaler.needed()
            if n is None:
                continue
            cur = dep.number_of_allocations
            lo, hi = t.scaler.load_bounds()
            time_s = t.scaler.time.value if t.scaler.time.has_value else float("nan")
            inputs = (f"rate={t.scaler.rate.value:.3f}/s time={time_s:.4f}s "
                      f"load=[{lo:.3f},{hi:.3f}] idle={t.scaler.idle_s:.1f}s sample={sample}")
            if n < cur and now - t.last_scale_up < self.scale_up_cooldown_s:
                log.debug("adaptive allocations scaler: not scaling [%s] down to [%d] within the "
                          "scale-up cooldown (%s)", dep.deployment_id, n, inputs)
                continue
            if cur > 0 and not any(r.routable for r in self._routes(dep)):
                continue  # only a started deployment is scaled (zero excepted)
            try:
                self._set_allocations(dep, n, "adaptive allocations")
            except TooManyRequests as e:
                if t.failure_logged != n:
                    log.warning("adaptive allocations scaler: scaling [%s] to [%d] allocations failed: "
                                "%s (%s)",
                                dep.deployment_id, n, e.reason, inputs)
                    t.failure_logged = n
                continue
            t.failure_logged = None
            if n > cur:
                t.last_scale_up = now
            t.scaler.set_allocations(n)
            log.info("adaptive allocations scaler: scaled [%s] from [%d] to [%d] allocations (%s)",
                     dep.deployment_id, cur, n, inputs)

    def expire_warm(self) -> None:
        """Release the model hosts kept warm at zero allocations once their time is up."""
        now = self.clock.wall_ms()
        for dep in self.deployments.values():
            gone = [n for n, until in dep.warm.items() if until <= now and dep.targets.get(n, 0) == 0]
            for node_id in gone:
                del dep.warm[node_id]
                log.info("deployment [%s]: releasing the warm model host on node [%s]",
                         dep.deployment_id, node_id)
                self._push_sync(node_id)
            if gone:
                self._save(dep)

    # ---- scale from zero ------------------------------------------------------------------------
    def request_at_zero(self, dep: DeploymentRecord) -> None:
        """A request found no allocation: a deployment scaled to zero gets one (and the scaler
        counts it as a scale-up, for the cooldown)."""
        if not (dep.adaptive and dep.adaptive.enabled and dep.number_of_allocations == 0):
            return
        t = self._track(dep)
        t.scaler.request_arrived()
        t.last_scale_up = self.clock.monotonic()
        log.info("adaptive allocations: a request for [%s] at zero allocations; starting one",
                 dep.deployment_id)
        self._set_allocations(dep, 1, "scale from zero")
        t.scaler.set_allocations(1)

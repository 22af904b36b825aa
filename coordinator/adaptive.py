"""Adaptive allocations in the coordinator: the scaler's tick, scale to zero with warm nodes,
and scale from zero for requests that find no allocation. A mixin of ``Coordinator``: it uses
its deployments, node reports, waiters and ``_set_allocations``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from mlfleet.common import messages as m
from mlfleet.common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
)
from mlfleet.common.units import format_time
from mlfleet.coordinator.scaler import Sample, Scaler
from mlfleet.coordinator.state import DeploymentRecord, RoutingState

log = logging.getLogger(__name__)
MAX_WAITING_FOR_ALLOCATION = 100


@dataclass
class _Track:
    scaler: Scaler
    last: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # node -> (count, total_ms, failed)
    last_tick: Optional[float] = None
    last_scale_up: float = float("-inf")
    failure_logged: Optional[int] = None


class AdaptiveMixin:
    def _adaptive_init(self) -> None:
        self.tracks: dict[str, _Track] = {}

    def _track(self, dep: DeploymentRecord) -> _Track:
        a = dep.adaptive
        t = self.tracks.get(dep.deployment_id)
        if t is None:
            t = self.tracks[dep.deployment_id] = _Track(Scaler(
                dep.number_of_allocations, scale_to_zero_after_s=self.cfg.scale_to_zero_after_s))
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

    def _adaptive_tick(self) -> None:
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
            if n < cur and now - t.last_scale_up < self.cfg.scale_up_cooldown_s:
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

    def _expire_warm(self) -> None:
        now = self.clock.wall_ms()
        for dep in self.deployments.values():
            gone = [n for n, until in dep.warm.items() if until <= now and dep.targets.get(n, 0) == 0]
            for node_id in gone:
                del dep.warm[node_id]
                log.info("deployment [%s]: releasing the warm model host on node [%s]",
                         dep.deployment_id, node_id)
                self._push_sync(node_id)
            if gone:
                self.store.save_deployment(dep)

    # ---- scale from zero ------------------------------------------------------------------------
    def on_await_routes(self, ident: bytes, msg: m.AwaitRoutes) -> Any:
        """A client found no allocation to send to. Answer with the routing table as soon as one
        serves (triggering one allocation if the deployment scaled to zero), 408 at the deadline."""
        if msg.timeout_ms <= 0:
            raise BadRequest("[timeout] must be positive")
        dep = self._deployment(msg.deployment_id)
        if dep.stopping:
            raise Conflict(f"Trained model deployment [{dep.deployment_id}] is [stopping]")
        routes = self._routes(dep)
        if any(r.routable for r in routes):
            return self.on_get_routing(ident, m.DeploymentRef(dep.deployment_id))
        if routes and all(r.routing_state == RoutingState.FAILED for r in routes):
            raise ServiceUnavailable(f"[{dep.deployment_id}] every allocation has failed: " + "; ".join(
                f"{r.node_id}: {r.reason}" for r in routes))
        waiting = sum(1 for w in self.waiters if w.tag == dep.deployment_id)
        if waiting >= MAX_WAITING_FOR_ALLOCATION:
            raise TooManyRequests(f"Rejected inference request waiting for an allocation of deployment "
                                  f"[{dep.deployment_id}]. Too many pending requests")
        if dep.adaptive and dep.adaptive.enabled and dep.number_of_allocations == 0:
            t = self._track(dep)
            t.scaler.request_arrived()
            t.last_scale_up = self.clock.monotonic()
            log.info("adaptive allocations: a request for [%s] at zero allocations; starting one",
                     dep.deployment_id)
            self._set_allocations(dep, 1, "scale from zero")
            t.scaler.set_allocations(1)
        timeout_s = msg.timeout_ms / 1000.0
        dep_id = dep.deployment_id

        def ready() -> Optional[tuple[int, dict]]:
            d = self.deployments.get(dep_id)
            if d is None:
                raise NotFound(f"No known model deployment with id [{dep_id}]")
            if d.stopping:
                raise Conflict(f"Trained model deployment [{dep_id}] is [stopping]")
            routes = self._routes(d)
            if any(r.routable for r in routes):
                return 200, self.on_get_routing(ident, m.DeploymentRef(dep_id))
            if routes and all(r.routing_state == RoutingState.FAILED for r in routes):
                raise ServiceUnavailable(f"[{dep_id}] every allocation has failed: " + "; ".join(
                    f"{r.node_id}: {r.reason}" for r in routes))
            return None

        def timed_out() -> tuple[int, dict]:
            e = RequestTimeout(f"Timed out after [{format_time(timeout_s)}] waiting for trained model "
                               f"deployment [{dep_id}] to start. Use the trained model stats API to "
                               "track the state of the deployment and try again once it has started.")
            return e.status, e.to_body()
        return self._park(ident, timeout_s, ready, timed_out, tag=dep_id)

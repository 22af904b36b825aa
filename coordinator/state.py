"""The coordinator's records and the pure functions that turn them into response bodies.

Route and assignment states are enums; the assignment state is derived from the routes
(``stopping`` is sticky), as in Elasticsearch's ``TrainedModelAssignment``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from mlfleet.common.clock import iso_ms
from mlfleet.common.messages import MAX_COUNTER
from mlfleet.common.params import Adaptive
from mlfleet.common.units import format_time, parse_bytes


class RoutingState(str, enum.Enum):
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class AssignmentState(str, enum.Enum):
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class ModelRecord:
    model_id: str
    sha256: str
    size: int
    task: str
    tokenizer_sha256: Optional[str]
    model_config: Optional[dict]
    create_time_ms: int

    def config_body(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_type": "pytorch", "model_size_bytes": self.size,
                "sha256": self.sha256, "task": self.task,
                "inference_config": {self.task: dict(self.model_config or {})},
                "tokenizer_sha256": self.tokenizer_sha256, "create_time": self.create_time_ms,
                "fully_defined": True}


@dataclass
class DeploymentRecord:
    deployment_id: str
    model_id: str
    number_of_allocations: int
    threads_per_allocation: int
    queue_capacity: int
    priority: str
    cache_size: Optional[str]
    adaptive: Optional[Adaptive]
    start_time_ms: int
    targets: dict[str, int] = field(default_factory=dict)
    stopping: bool = False
    finish_pending_work: bool = False
    max_assigned_allocations: int = 0
    reason: str = ""
    routing_version: int = 0
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0
    warm: dict[str, int] = field(default_factory=dict)  # node -> until (epoch ms): model host kept at zero

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["adaptive"] = self.adaptive.to_body() if self.adaptive else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeploymentRecord:
        d = dict(d)
        d["adaptive"] = Adaptive(**d["adaptive"]) if d.get("adaptive") else None
        return cls(**d)

    def cache_size_str(self, model: ModelRecord) -> str:
        return self.cache_size if self.cache_size is not None else f"{model.size}b"

    def cache_bytes(self, model: ModelRecord) -> int:
        return parse_bytes(self.cache_size_str(model))


@dataclass
class RouteReport:
    routing_state: RoutingState
    current_allocations: int
    target_allocations: int
    reason: str
    stats: dict[str, Any]


@dataclass
class NodeRecord:
    node_id: str
    hostname: str
    transport_address: str
    allocated_processors: int
    cpu: dict[str, Any]
    memory: dict[str, Any]
    pid: int
    last_seen: float
    alive: bool = True
    reports: dict[str, RouteReport] = field(default_factory=dict)
    public_key: Optional[str] = None  # the agent's CURVE key (z85), for clients to reach it
    ident: bytes = b""                # the connection (ZeroMQ routing id) it registered from
    bulk_token: str = ""              # given in the register reply: its bulk connection's credential
    ignored: set[str] = field(default_factory=set)  # deployments it reported without being assigned

    def body(self, deployments: list[str]) -> dict[str, Any]:
        return {"name": self.node_id, "hostname": self.hostname,
                "transport_address": self.transport_address,
                "allocated_processors": self.allocated_processors,
                "cpu": {"physical": self.cpu.get("physical"), "logical": self.cpu.get("logical")},
                "memory": {"total_bytes": self.memory.get("total_bytes", 0),
                           "available_bytes": self.memory.get("available_bytes", 0)},
                "deployments": deployments}


@dataclass(frozen=True)
class Ctx:
    """The request being handled: who sent it (its connection and, with CURVE, its key) and its
    id. Handlers get it explicitly; an answer given later (a parked waiter, offloaded work) keeps
    it to reply to."""
    ident: bytes
    rid: int
    user: Optional[str] = None


# ---- derived views -------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    node_id: str
    routing_state: RoutingState
    current_allocations: int
    target_allocations: int
    reason: str

    @property
    def routable(self) -> bool:
        return self.routing_state == RoutingState.STARTED and self.current_allocations > 0


def routes_of(dep: DeploymentRecord, nodes: dict[str, NodeRecord],
              reporting: Optional[set[str]] = None) -> list[Route]:
    """The routing table: a route per live node that is targeted or still runs the deployment.
    ``reporting`` (the nodes known to report the deployment, kept by ``RoutingIndex``) spares a
    scan of every node; without it the nodes are scanned, which is the definition the index is
    tested against."""
    out = []
    if reporting is None:
        reporting = {n for n, node in nodes.items() if dep.deployment_id in node.reports}
    node_ids = set(dep.targets) | reporting
    for node_id in sorted(node_ids):
        node = nodes.get(node_id)
        if node is None or not node.alive:
            continue
        target = dep.targets.get(node_id, 0)
        if target == 0 and node_id in dep.warm and not dep.stopping:
            continue  # a warm model host at zero allocations serves nothing: not a route
        rep = node.reports.get(dep.deployment_id)
        if rep is None:
            if target == 0:
                continue
            state, current, reason = RoutingState.STARTING, 0, ""
        else:
            state, current, reason = rep.routing_state, rep.current_allocations, rep.reason
            if state == RoutingState.STOPPED:
                continue
            if target == 0 and state != RoutingState.FAILED:
                state = RoutingState.STOPPING
        if dep.stopping and state != RoutingState.FAILED:
            state = RoutingState.STOPPING
        out.append(Route(node_id, state, current, target, reason))
    return out


def assignment_state(dep: DeploymentRecord, routes: list[Route]) -> AssignmentState:
    if dep.stopping:
        return AssignmentState.STOPPING
    if dep.number_of_allocations == 0:  # scaled to zero (adaptive): started, with nothing to run
        return AssignmentState.STARTED
    if any(r.routing_state == RoutingState.STARTED for r in routes):
        return AssignmentState.STARTED
    if routes and all(r.routing_state == RoutingState.FAILED for r in routes):
        return AssignmentState.FAILED
    return AssignmentState.STARTING


def allocation_status(dep: DeploymentRecord, routes: list[Route]) -> dict[str, Any]:
    count = sum(r.current_allocations for r in routes if r.routable)
    target = dep.number_of_allocations
    if target == 0 or count >= target:
        state = "fully_allocated"
    elif count == 0:
        state = "starting"
    else:
        state = "started"
    return {"allocation_count": count, "target_allocation_count": target, "state": state}


def task_parameters(dep: DeploymentRecord, model: ModelRecord) -> dict[str, Any]:
    return {"model_id": dep.model_id, "deployment_id": dep.deployment_id, "model_bytes": model.size,
            "threads_per_allocation": dep.threads_per_allocation,
            "number_of_allocations": dep.number_of_allocations,
            "queue_capacity": dep.queue_capacity, "cache_size": dep.cache_size_str(model),
            "priority": dep.priority, "max_batch_size": dep.max_batch_size,
            "max_batch_delay": format_time(dep.max_batch_delay_ms / 1000.0)}


def adaptive_body(dep: DeploymentRecord) -> dict[str, Any]:
    return (dep.adaptive or Adaptive()).to_body()


def assignment_body(dep: DeploymentRecord, model: ModelRecord, routes: list[Route]) -> dict[str, Any]:
    current = sum(r.current_allocations for r in routes if r.routable)
    return {"assignment": {
        "task_parameters": task_parameters(dep, model),
        "routing_table": {r.node_id: {"routing_state": r.routing_state.value,
                                      "current_allocations": r.current_allocations,
                                      "target_allocations": r.target_allocations,
                                      "reason": r.reason} for r in routes},
        "assignment_state": assignment_state(dep, routes).value,
        "start_time": iso_ms(dep.start_time_ms),
        "max_assigned_allocations": max(dep.max_assigned_allocations, current),
        "adaptive_allocations": adaptive_body(dep),
        "reason": dep.reason,
    }}


_NODE_COUNTERS = ("inference_count", "error_count", "rejected_execution_count", "timeout_count",
                  "inference_cache_hit_count", "number_of_pending_requests",
                  "peak_throughput_per_minute", "throughput_last_minute")


def node_stats_body(route: Route, node: NodeRecord, dep: DeploymentRecord) -> dict[str, Any]:
    rep = node.reports.get(dep.deployment_id)
    s = rep.stats if rep else {}
    body: dict[str, Any] = {
        "node": {node.node_id: {"name": node.node_id, "transport_address": node.transport_address,
                                "hostname": node.hostname}},
        "routing_state": {"routing_state": route.routing_state.value, "reason": route.reason},
    }
    for k in _NODE_COUNTERS:
        body[k] = int(s.get(k, 0))
    body["average_inference_time_ms"] = float(s.get("average_inference_time_ms", 0.0))
    body["average_inference_time_ms_excluding_cache_hits"] = float(
        s.get("average_inference_time_ms_excluding_cache_hits", 0.0))
    body["average_batch_size"] = float(s.get("average_batch_size", 0.0))
    body["number_of_allocations"] = route.current_allocations
    body["threads_per_allocation"] = dep.threads_per_allocation
    st = s.get("start_time")
    body["start_time"] = iso_ms(st) if st else None
    la = s.get("last_access")
    body["last_access"] = iso_ms(la) if la else None
    return body


def deployment_stats_body(dep: DeploymentRecord, model: ModelRecord, routes: list[Route],
                          nodes: dict[str, NodeRecord]) -> dict[str, Any]:
    node_bodies = [node_stats_body(r, nodes[r.node_id], dep) for r in routes]

    def summed(key: str) -> int:
        # each node's counter is at most MAX_COUNTER (2**63-1); their sum is clamped to it, so the
        # answer stays within msgpack's integers however many nodes report
        return min(sum(n[key] for n in node_bodies), MAX_COUNTER)

    total = sum(n["inference_count"] for n in node_bodies)
    avg = (sum(n["average_inference_time_ms"] * n["inference_count"] for n in node_bodies) / total
           if total else 0.0)
    return {
        "model_id": dep.model_id,
        "model_size_stats": {"model_size_bytes": model.size,
                             "required_native_memory_bytes": 0},
        "deployment_stats": {
            "deployment_id": dep.deployment_id, "model_id": dep.model_id,
            "state": assignment_state(dep, routes).value, "reason": dep.reason,
            "allocation_status": allocation_status(dep, routes),
            "number_of_allocations": dep.number_of_allocations,
            "threads_per_allocation": dep.threads_per_allocation,
            "queue_capacity": dep.queue_capacity, "cache_size": dep.cache_size_str(model),
            "priority": dep.priority, "start_time": iso_ms(dep.start_time_ms),
            "inference_count": summed("inference_count"),
            "error_count": summed("error_count"),
            "rejected_execution_count": summed("rejected_execution_count"),
            "timeout_count": summed("timeout_count"),
            "average_inference_time_ms": avg,
            "peak_throughput_per_minute": summed("peak_throughput_per_minute"),
            "adaptive_allocations": adaptive_body(dep),
            "nodes": node_bodies,
        },
    }

"""Placement: a pure function (nodes, deployments with their current placement) -> new placement.

Rules, after Elasticsearch's ``TrainedModelAssignmentRebalancer``:

* a normal deployment uses ``allocations x threads`` processors, and on every node the normal
  deployments never exceed its allocated processors;
* a deployment costs its model's memory once per node it runs on, however many allocations;
* low priority: one allocation of one thread that needs memory but no free processor;
* current placements are kept where still valid (surplus is taken from the smallest placements
  first, as ``AllocationReducer`` does), so an update moves as few allocations as it can;
* new allocations are packed onto as few nodes as fit (a node already running the deployment
  first, then the node that takes the most), which saves copies of the model;
* what cannot be placed is reported as a per-node ``reason``.

Deterministic: nodes and deployments are visited in a fixed order; no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

MB = 1 << 20
PROCESS_OVERHEAD_BYTES = 240 * MB  # Elasticsearch's per-deployment base estimate


def memory_estimate(model_bytes: int, cache_bytes: int = 0) -> int:
    """Memory one node needs to run one deployment (Elasticsearch's estimate; the weights are held
    once per node, counted twice to leave room for loading)."""
    return PROCESS_OVERHEAD_BYTES + 2 * model_bytes + max(0, cache_bytes - model_bytes)


@dataclass(frozen=True)
class PlanNode:
    node_id: str
    processors: int
    memory_bytes: int


@dataclass(frozen=True)
class PlanDeployment:
    deployment_id: str
    allocations: int
    threads: int
    memory_bytes: int
    priority: str = "normal"
    current: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    assignments: dict[str, dict[str, int]]
    reasons: dict[str, str]

    def placed(self, deployment_id: str) -> int:
        return sum(self.assignments.get(deployment_id, {}).values())


@dataclass
class _Room:
    node: PlanNode
    cores: int
    memory: int
    hosts: set[str] = field(default_factory=set)


def _reduce(current: dict[str, int], target: int) -> dict[str, int]:
    """Take allocations away without moving the rest: smallest placements first."""
    cur = dict(current)
    excess = sum(cur.values()) - target
    while excess > 0:
        node = min(cur, key=lambda n: (cur[n], n))
        if cur[node] <= excess:
            excess -= cur.pop(node)
        else:
            cur[node] -= excess
            excess = 0
    return cur


def _shortfall_reason(d: PlanDeployment, rooms: list[_Room]) -> str:
    if not rooms:
        return "No ML nodes exist in the cluster"
    parts = []
    for r in rooms:
        why = None
        if d.deployment_id not in r.hosts and r.memory < d.memory_bytes:
            why = (f"This node has insufficient available memory. Available memory for ML "
                   f"[{r.node.memory_bytes}], free memory [{r.memory}], estimated memory required "
                   f"for this model [{d.memory_bytes}].")
        elif d.priority != "low" and r.cores < d.threads:
            why = (f"This node has insufficient allocated processors. Available processors "
                   f"[{r.node.processors}], free processors [{r.cores}], processors required for "
                   f"each allocation of this model [{d.threads}]")
        if why:
            parts.append(f"Could not assign (more) allocations on node [{r.node.node_id}]. Reason: {why}")
    return "|".join(parts)


def plan(nodes: list[PlanNode], deployments: list[PlanDeployment]) -> Plan:
    rooms = {n.node_id: _Room(n, n.processors, n.memory_bytes)
             for n in sorted(nodes, key=lambda n: n.node_id)}
    order = sorted(deployments, key=lambda d: (d.priority == "low", -d.allocations * d.threads,
                                               d.deployment_id))
    out: dict[str, dict[str, int]] = {d.deployment_id: {} for d in deployments}

    # 1. Keep what runs (normal first, then low), trimmed to the target and to what still fits.
    for d in order:
        kept = {n: c for n, c in d.current.items() if c > 0 and n in rooms}
        kept = _reduce(kept, d.allocations)
        for node_id in sorted(kept):
            room, count = rooms[node_id], kept[node_id]
            if d.priority != "low":
                count = min(count, room.cores // d.threads)
            if count <= 0 or room.memory < d.memory_bytes:
                continue
            room.memory -= d.memory_bytes
            room.hosts.add(d.deployment_id)
            if d.priority != "low":
                room.cores -= count * d.threads
            out[d.deployment_id][node_id] = count

    # 2. Place the rest, packing onto as few nodes as fit.
    reasons: dict[str, str] = {}
    for d in order:
        placed = out[d.deployment_id]
        need = d.allocations - sum(placed.values())
        while need > 0:
            best: _Room | None = None
            best_key: tuple[bool, int, int, int] | None = None
            for room in rooms.values():
                hosts = d.deployment_id in room.hosts
                if not hosts and room.memory < d.memory_bytes:
                    continue
                fit = need if d.priority == "low" else min(need, room.cores // d.threads)
                if fit <= 0:
                    continue
                key = (hosts, fit, room.cores, room.memory)
                if best_key is None or key > best_key:
                    best, best_key = room, key
            if best is None or best_key is None:
                break
            fit = best_key[1]
            if d.deployment_id not in best.hosts:
                best.hosts.add(d.deployment_id)
                best.memory -= d.memory_bytes
            if d.priority != "low":
                best.cores -= fit * d.threads
            placed[best.node.node_id] = placed.get(best.node.node_id, 0) + fit
            need -= fit
        if need > 0:
            reasons[d.deployment_id] = _shortfall_reason(d, list(rooms.values()))
    return Plan(assignments=out, reasons=reasons)

"""The planner at scale: 500 deployments over 1,000 simulated nodes of mixed sizes. Measures the
plan's time, checks that it is deterministic, and that an update of one deployment moves no
other deployment's allocations. Baseline in the same run: a plain first-fit placement.

    .venv/bin/python -m bench.planner
"""

from __future__ import annotations

import random
import time

from bench._util import table
from mlfleet.coordinator.planner import PlanDeployment, PlanNode, memory_estimate, plan

GB = 1 << 30


def cluster(seed: int = 7) -> tuple[list[PlanNode], list[PlanDeployment]]:
    rng = random.Random(seed)
    nodes = [PlanNode(f"node-{i:04d}", rng.choice([4, 8, 16, 32, 64]), rng.choice([16, 32, 64, 128]) * GB)
             for i in range(1000)]
    deps = []
    for i in range(500):
        low = rng.random() < 0.05
        deps.append(PlanDeployment(
            f"dep-{i:03d}",
            1 if low else rng.choice([1, 1, 2, 4, 8, 16]),
            1 if low else rng.choice([1, 2, 4]),
            memory_estimate(rng.choice([50, 100, 400, 1200]) << 20),
            "low" if low else "normal"))
    return nodes, deps


def first_fit(nodes: list[PlanNode], deps: list[PlanDeployment]) -> int:
    free = {n.node_id: n.processors for n in nodes}
    placed = 0
    for d in deps:
        need = d.allocations
        for n in nodes:
            while need and free[n.node_id] >= d.threads:
                free[n.node_id] -= d.threads
                need -= 1
                placed += 1
            if not need:
                break
    return placed


def main() -> None:
    nodes, deps = cluster()
    t0 = time.perf_counter()
    baseline_placed = first_fit(nodes, deps)
    t_ff = time.perf_counter() - t0

    t0 = time.perf_counter()
    p1 = plan(nodes, deps)
    t_plan = time.perf_counter() - t0
    shuffled_nodes, shuffled_deps = nodes[::-1], deps[::-1]
    p2 = plan(shuffled_nodes, shuffled_deps)
    deterministic = p1.assignments == p2.assignments

    # re-plan with everything placed where it is, one deployment asking for more
    current = [PlanDeployment(d.deployment_id, d.allocations, d.threads, d.memory_bytes, d.priority,
                              p1.assignments[d.deployment_id]) for d in deps]
    target = current[123]
    current[123] = PlanDeployment(target.deployment_id, target.allocations + 4, target.threads,
                                  target.memory_bytes, target.priority, target.current)
    t0 = time.perf_counter()
    p3 = plan(nodes, current)
    t_update = time.perf_counter() - t0
    moved = [d.deployment_id for d in current if d.deployment_id != target.deployment_id
             and p3.assignments[d.deployment_id] != p1.assignments[d.deployment_id]]
    wanted = sum(d.allocations for d in deps)
    placed = sum(p1.placed(d.deployment_id) for d in deps)
    copies = sum(len(a) for a in p1.assignments.values())
    print(table("Planner: 500 deployments (5% low priority) over 1,000 nodes of 4-64 processors",
                ["what", "value"],
                [["plan time (s)", f"{t_plan:.3f}"],
                 ["first-fit baseline time (s)", f"{t_ff:.3f}"],
                 ["allocations wanted / placed (first-fit placed)",
                  f"{wanted} / {placed} ({baseline_placed})"],
                 ["model copies (deployment-node pairs)", copies],
                 ["same plan with nodes and deployments reversed", deterministic],
                 ["re-plan after one deployment's update (s)", f"{t_update:.3f}"],
                 ["other deployments moved by that update", len(moved)],
                 [f"{target.deployment_id} placed after the update",
                  f"{p3.placed(target.deployment_id)} of {target.allocations + 4}"]]))


if __name__ == "__main__":
    main()

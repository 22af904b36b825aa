"""Pure unit tests of coordinator.planner: no processes, no sockets."""

from __future__ import annotations

import random

import pytest

from mlfleet.coordinator.planner import (
    MB,
    PROCESS_OVERHEAD_BYTES,
    PlanDeployment,
    PlanNode,
    memory_estimate,
    plan,
)

pytestmark = pytest.mark.timeout(60)

GB = 1 << 30


def node(node_id: str, processors: int = 4, memory: int = 16 * GB) -> PlanNode:
    return PlanNode(node_id=node_id, processors=processors, memory_bytes=memory)


def dep(deployment_id: str, allocations: int = 1, threads: int = 1, memory: int = 500 * MB,
        priority: str = "normal", current: dict | None = None) -> PlanDeployment:
    return PlanDeployment(deployment_id=deployment_id, allocations=allocations, threads=threads,
                          memory_bytes=memory, priority=priority, current=current or {})


def nonzero(assignment: dict[str, int]) -> dict[str, int]:
    return {n: c for n, c in assignment.items() if c > 0}


def used_processors(p, deployments, node_id: str) -> int:
    by_id = {d.deployment_id: d for d in deployments}
    return sum(a.get(node_id, 0) * by_id[d].threads for d, a in p.assignments.items()
               if by_id[d].priority != "low")


def used_memory(p, deployments, node_id: str) -> int:
    by_id = {d.deployment_id: d for d in deployments}
    return sum(by_id[d].memory_bytes for d, a in p.assignments.items() if a.get(node_id, 0) > 0)


def check_invariants(p, nodes, deployments) -> None:
    """No node over its processors (normal deployments) or its memory; no deployment over target;
    a shortfall always has a reason."""
    for n in nodes:
        assert used_processors(p, deployments, n.node_id) <= n.processors, n.node_id
        assert used_memory(p, deployments, n.node_id) <= n.memory_bytes, n.node_id
    known = {n.node_id for n in nodes}
    for d in deployments:
        a = p.assignments[d.deployment_id]
        assert set(nonzero(a)) <= known
        assert all(c >= 0 for c in a.values())
        assert p.placed(d.deployment_id) <= d.allocations
        if p.placed(d.deployment_id) < d.allocations:
            assert p.reasons.get(d.deployment_id), d.deployment_id
        else:
            assert d.deployment_id not in p.reasons


# ---- memory_estimate ------------------------------------------------------------------------

def test_memory_estimate_counts_overhead_and_model_twice():
    assert memory_estimate(0) == PROCESS_OVERHEAD_BYTES
    assert memory_estimate(100 * MB) == PROCESS_OVERHEAD_BYTES + 200 * MB


def test_memory_estimate_cache_only_counts_above_model_size():
    assert memory_estimate(100 * MB, 50 * MB) == memory_estimate(100 * MB)
    assert memory_estimate(100 * MB, 100 * MB) == memory_estimate(100 * MB)
    assert memory_estimate(100 * MB, 300 * MB) == memory_estimate(100 * MB) + 200 * MB


# ---- basic placement -------------------------------------------------------------------------

def test_six_allocations_over_two_four_core_nodes_split_four_and_two():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=6)]
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert sorted(a.values()) == [2, 4]
    assert all(c <= 4 for c in a.values())
    assert p.placed("d") == 6
    assert p.reasons == {}
    check_invariants(p, nodes, deps)


def test_four_allocations_pack_onto_one_node():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=4)]
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert len(a) == 1
    assert list(a.values()) == [4]
    assert p.reasons == {}


def test_small_deployments_pack_onto_as_few_nodes_as_fit():
    nodes = [node("a"), node("b"), node("c")]
    deps = [dep("x", allocations=2), dep("y", allocations=2)]
    p = plan(nodes, deps)
    check_invariants(p, nodes, deps)
    assert p.placed("x") == 2 and p.placed("y") == 2
    assert len(nonzero(p.assignments["x"])) == 1
    assert len(nonzero(p.assignments["y"])) == 1


def test_threads_per_allocation_two_uses_two_processors_each():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=3, threads=2)]
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert sorted(a.values()) == [1, 2]  # 2 x 2 threads on one node, 1 x 2 on the other
    assert p.placed("d") == 3
    check_invariants(p, nodes, deps)


def test_threads_per_allocation_larger_than_any_node_places_nothing():
    nodes = [node("a", processors=4), node("b", processors=4)]
    deps = [dep("d", allocations=1, threads=8)]
    p = plan(nodes, deps)
    assert p.placed("d") == 0
    assert "insufficient allocated processors" in p.reasons["d"]
    assert "[a]" in p.reasons["d"] and "[b]" in p.reasons["d"]


def test_full_node_gets_nothing_more_and_reason_names_processors():
    nodes = [node("a")]
    deps = [dep("busy", allocations=4, current={"a": 4}), dep("new", allocations=1)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["busy"]) == {"a": 4}
    assert p.placed("new") == 0
    reason = p.reasons["new"]
    assert "insufficient allocated processors" in reason
    assert "[a]" in reason
    check_invariants(p, nodes, deps)


def test_full_node_is_skipped_and_other_node_used():
    nodes = [node("a"), node("b")]
    deps = [dep("busy", allocations=4, current={"a": 4}), dep("new", allocations=6)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["busy"]) == {"a": 4}
    assert nonzero(p.assignments["new"]) == {"b": 4}
    reason = p.reasons["new"]
    assert "insufficient allocated processors" in reason
    assert "node [a]" in reason and "node [b]" in reason
    check_invariants(p, nodes, deps)


def test_model_bigger_than_every_node_memory_gets_nothing():
    nodes = [node("a", memory=1 * GB), node("b", memory=2 * GB)]
    deps = [dep("huge", allocations=1, memory=3 * GB)]
    p = plan(nodes, deps)
    assert p.placed("huge") == 0
    reason = p.reasons["huge"]
    assert "insufficient available memory" in reason
    assert "[a]" in reason and "[b]" in reason
    assert "insufficient allocated processors" not in reason


def test_memory_shortfall_on_one_node_only():
    nodes = [node("small", memory=1 * GB), node("big", memory=8 * GB)]
    deps = [dep("m", allocations=8, memory=2 * GB)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["m"]) == {"big": 4}
    reason = p.reasons["m"]
    assert "node [small]" in reason and "insufficient available memory" in reason
    assert "node [big]" in reason and "insufficient allocated processors" in reason


def test_no_nodes_reason():
    p = plan([], [dep("d", allocations=2)])
    assert p.placed("d") == 0
    assert p.reasons["d"] == "No ML nodes exist in the cluster"
    assert p.assignments == {"d": {}}


def test_no_deployments_empty_plan():
    p = plan([node("a")], [])
    assert p.assignments == {}
    assert p.reasons == {}


def test_placed_of_unknown_deployment_is_zero():
    p = plan([node("a")], [dep("d")])
    assert p.placed("nope") == 0


# ---- memory once per node ---------------------------------------------------------------------

def test_memory_counts_once_per_node_not_per_allocation():
    # 4 allocations of a 1 GB deployment on one node of 1.5 GB: it must fit (1 GB, not 4 GB).
    nodes = [node("a", processors=4, memory=int(1.5 * GB))]
    deps = [dep("d", allocations=4, memory=1 * GB)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["d"]) == {"a": 4}
    assert p.reasons == {}


def test_memory_once_per_node_leaves_room_for_another_deployment():
    nodes = [node("a", processors=8, memory=2 * GB)]
    deps = [dep("x", allocations=4, memory=1 * GB), dep("y", allocations=4, memory=1 * GB)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["x"]) == {"a": 4}
    assert nonzero(p.assignments["y"]) == {"a": 4}
    check_invariants(p, nodes, deps)


def test_memory_once_per_node_with_current_placement():
    nodes = [node("a", processors=8, memory=2 * GB)]
    deps = [dep("x", allocations=4, memory=1 * GB, current={"a": 2}),
            dep("y", allocations=4, memory=1 * GB, current={"a": 1})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["x"]) == {"a": 4}
    assert nonzero(p.assignments["y"]) == {"a": 4}
    check_invariants(p, nodes, deps)


def test_memory_blocks_second_deployment_on_the_same_node():
    nodes = [node("a", processors=8, memory=int(1.5 * GB)), node("b", processors=8,
                                                                 memory=int(1.5 * GB))]
    deps = [dep("x", allocations=2, memory=1 * GB), dep("y", allocations=2, memory=1 * GB)]
    p = plan(nodes, deps)
    check_invariants(p, nodes, deps)
    assert p.placed("x") == 2 and p.placed("y") == 2
    assert set(nonzero(p.assignments["x"])) != set(nonzero(p.assignments["y"]))


# ---- keeping current placements ----------------------------------------------------------------

def replan(nodes, deps, p):
    """The same deployments with the plan's placement as their current one."""
    return [PlanDeployment(d.deployment_id, d.allocations, d.threads, d.memory_bytes, d.priority,
                           dict(p.assignments[d.deployment_id])) for d in deps]


def test_replan_with_same_inputs_changes_nothing():
    nodes = [node("a"), node("b"), node("c", processors=8)]
    deps = [dep("x", allocations=5), dep("y", allocations=3, threads=2), dep("z", allocations=2),
            dep("lo", priority="low")]
    first = plan(nodes, deps)
    second = plan(nodes, replan(nodes, deps, first))
    assert {k: nonzero(v) for k, v in second.assignments.items()} == \
        {k: nonzero(v) for k, v in first.assignments.items()}
    assert second.reasons == first.reasons
    third = plan(nodes, replan(nodes, deps, second))
    assert third.assignments == second.assignments


def test_current_placement_kept_even_where_packing_would_differ():
    # Spread 1+1 over two nodes: a fresh plan would pack, but a valid placement is kept.
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=2, current={"a": 1, "b": 1})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["d"]) == {"a": 1, "b": 1}
    assert p.reasons == {}


def test_adding_a_deployment_does_not_move_existing_one():
    nodes = [node("a"), node("b"), node("c")]
    existing = [dep("x", allocations=3), dep("y", allocations=2)]
    first = plan(nodes, existing)
    kept = replan(nodes, existing, first)
    # The newcomer is larger than both existing ones, so it is visited first in the order.
    deps = kept + [dep("big", allocations=6)]
    second = plan(nodes, deps)
    for d in existing:
        assert nonzero(second.assignments[d.deployment_id]) == \
            nonzero(first.assignments[d.deployment_id])
    assert second.placed("big") == 6  # 12 processors, 5 in use
    check_invariants(second, nodes, deps)


def test_increasing_allocations_keeps_existing_and_adds_rest():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=6, current={"a": 2})]
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert a["a"] >= 2
    assert p.placed("d") == 6
    # The node already running the deployment is filled first (no extra model copy).
    assert a == {"a": 4, "b": 2}


def test_decreasing_allocations_takes_from_smallest_first():
    nodes = [node("a"), node("b"), node("c")]
    deps = [dep("d", allocations=4, current={"a": 1, "b": 3, "c": 2})]
    p = plan(nodes, deps)
    # 6 -> 4: the smallest placement (a: 1) goes, then one from the next smallest (c: 2 -> 1).
    assert nonzero(p.assignments["d"]) == {"b": 3, "c": 1}
    assert p.reasons == {}


def test_decreasing_allocations_removes_whole_smallest_placement():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=4, current={"a": 4, "b": 2})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["d"]) == {"a": 4}


def test_decreasing_allocations_partial_from_smallest_does_not_move_rest():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=5, current={"a": 4, "b": 2})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["d"]) == {"a": 4, "b": 1}


def test_current_on_node_with_too_few_processors_is_trimmed():
    # A node's processors dropped from 4 to 2: the kept placement shrinks, the rest goes elsewhere.
    nodes = [node("a", processors=2), node("b")]
    deps = [dep("d", allocations=4, current={"a": 4})]
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert a["a"] == 2
    assert p.placed("d") == 4
    check_invariants(p, nodes, deps)


def test_zero_entries_in_current_are_ignored():
    nodes = [node("a"), node("b")]
    deps = [dep("d", allocations=1, current={"a": 0, "b": 1})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["d"]) == {"b": 1}


# ---- lost nodes --------------------------------------------------------------------------------

def test_lost_node_allocations_replanned_elsewhere():
    nodes = [node("b"), node("c")]
    deps = [dep("d", allocations=4, current={"a": 4})]  # node a is gone
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert "a" not in a
    assert p.placed("d") == 4
    assert p.reasons == {}


def test_lost_node_allocations_replanned_partially():
    nodes = [node("b")]
    deps = [dep("other", allocations=2, current={"b": 2}),
            dep("d", allocations=4, current={"a": 4})]  # node a is gone; b has 2 free cores
    p = plan(nodes, deps)
    assert nonzero(p.assignments["other"]) == {"b": 2}
    assert nonzero(p.assignments["d"]) == {"b": 2}
    assert "insufficient allocated processors" in p.reasons["d"]
    check_invariants(p, nodes, deps)


def test_lost_node_keeps_surviving_placements():
    nodes = [node("a"), node("c")]
    deps = [dep("d", allocations=6, current={"a": 3, "b": 3})]  # b is gone
    p = plan(nodes, deps)
    a = nonzero(p.assignments["d"])
    assert "b" not in a
    assert a["a"] >= 3
    assert p.placed("d") == 6
    check_invariants(p, nodes, deps)


def test_all_nodes_lost():
    deps = [dep("d", allocations=2, current={"a": 2})]
    p = plan([], deps)
    assert nonzero(p.assignments["d"]) == {}
    assert p.reasons["d"] == "No ML nodes exist in the cluster"


# ---- low priority ------------------------------------------------------------------------------

def test_low_priority_placed_on_node_with_all_processors_used():
    nodes = [node("a")]
    deps = [dep("normal", allocations=4), dep("lo", priority="low")]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["normal"]) == {"a": 4}
    assert nonzero(p.assignments["lo"]) == {"a": 1}
    assert p.reasons == {}


def test_low_priority_does_not_take_processors_from_normal():
    nodes = [node("a")]
    deps = [dep("lo", priority="low", current={"a": 1}), dep("normal", allocations=4)]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["normal"]) == {"a": 4}
    assert nonzero(p.assignments["lo"]) == {"a": 1}


def test_several_low_priority_deployments_share_a_full_node():
    nodes = [node("a", processors=1)]
    deps = [dep("normal", allocations=1)] + [dep(f"lo{i}", priority="low") for i in range(5)]
    p = plan(nodes, deps)
    assert p.placed("normal") == 1
    for i in range(5):
        assert p.placed(f"lo{i}") == 1
    assert p.reasons == {}


def test_low_priority_still_needs_memory():
    nodes = [node("a", memory=1 * GB)]
    deps = [dep("lo", priority="low", memory=2 * GB)]
    p = plan(nodes, deps)
    assert p.placed("lo") == 0
    assert "insufficient available memory" in p.reasons["lo"]


def test_low_priority_with_no_nodes():
    p = plan([], [dep("lo", priority="low")])
    assert p.reasons["lo"] == "No ML nodes exist in the cluster"


# ---- determinism ------------------------------------------------------------------------------

def mixed_cluster(seed: int, n_nodes: int, n_deps: int):
    rnd = random.Random(seed)
    nodes = [node(f"n{i:04d}", processors=rnd.choice([1, 2, 4, 8, 16, 32]),
                  memory=rnd.choice([1, 2, 4, 8, 16, 64]) * GB) for i in range(n_nodes)]
    deps = []
    for i in range(n_deps):
        if rnd.random() < 0.1:
            deps.append(dep(f"d{i:04d}", priority="low", memory=rnd.choice([300, 600, 2000]) * MB))
        else:
            deps.append(dep(f"d{i:04d}", allocations=rnd.randint(1, 12),
                            threads=rnd.choice([1, 1, 2, 4, 8]),
                            memory=rnd.choice([300, 600, 2000, 5000]) * MB))
    return nodes, deps


@pytest.mark.parametrize("seed", range(5))
def test_deterministic_under_shuffled_input(seed):
    nodes, deps = mixed_cluster(seed, 12, 25)
    p1 = plan(nodes, deps)
    rnd = random.Random(1000 + seed)
    for _ in range(3):
        n2, d2 = list(nodes), list(deps)
        rnd.shuffle(n2)
        rnd.shuffle(d2)
        p2 = plan(n2, d2)
        assert p2.assignments == p1.assignments
        assert p2.reasons == p1.reasons
    check_invariants(p1, nodes, deps)


def test_deterministic_with_current_placements_shuffled():
    nodes, deps = mixed_cluster(42, 10, 20)
    first = plan(nodes, deps)
    current = replan(nodes, deps, first)
    # Change some targets, drop a node, then shuffle.
    current = [PlanDeployment(d.deployment_id, max(1, d.allocations + (i % 3) - 1), d.threads,
                              d.memory_bytes, d.priority if d.priority == "low" else "normal",
                              d.current) for i, d in enumerate(current)]
    current = [d if d.priority != "low" else PlanDeployment(d.deployment_id, 1, 1, d.memory_bytes,
                                                            "low", d.current) for d in current]
    fewer = nodes[1:]
    p1 = plan(fewer, current)
    rnd = random.Random(7)
    n2, d2 = list(fewer), list(current)
    rnd.shuffle(n2)
    rnd.shuffle(d2)
    p2 = plan(n2, d2)
    assert p2.assignments == p1.assignments
    assert p2.reasons == p1.reasons
    check_invariants(p1, fewer, current)


def test_plan_does_not_mutate_inputs():
    nodes = [node("a"), node("b")]
    cur = {"a": 2}
    deps = [dep("d", allocations=6, current=cur)]
    plan(nodes, deps)
    assert cur == {"a": 2}
    assert deps[0].current == {"a": 2}


# ---- randomized invariants and scale ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_random_clusters_respect_capacity(seed):
    nodes, deps = mixed_cluster(100 + seed, 20, 40)
    p = plan(nodes, deps)
    check_invariants(p, nodes, deps)
    # And after a re-plan with the result as current, nothing changes.
    again = plan(nodes, replan(nodes, deps, p))
    assert {k: nonzero(v) for k, v in again.assignments.items()} == \
        {k: nonzero(v) for k, v in p.assignments.items()}


def test_scale_500_deployments_over_1000_nodes():
    nodes, deps = mixed_cluster(2024, 1000, 500)
    p = plan(nodes, deps)
    assert set(p.assignments) == {d.deployment_id for d in deps}
    for d in deps:
        assert p.placed(d.deployment_id) == d.allocations or p.reasons.get(d.deployment_id)
    check_invariants(p, nodes, deps)
    # With this much room nearly everything fits.
    placed = sum(1 for d in deps if p.placed(d.deployment_id) == d.allocations)
    assert placed >= 0.9 * len(deps)


def test_overcommitted_current_state_is_repaired():
    # Both say they run on a (4 processors) with 6 allocations between them: the larger keeps its
    # place, the smaller is moved where it fits.
    nodes = [node("a"), node("b")]
    deps = [dep("x", allocations=4, current={"a": 4}), dep("y", allocations=2, current={"a": 2})]
    p = plan(nodes, deps)
    assert nonzero(p.assignments["x"]) == {"a": 4}
    assert nonzero(p.assignments["y"]) == {"b": 2}
    assert p.reasons == {}
    check_invariants(p, nodes, deps)

"""The incremental routing index against the pure definition (state.routes_of scanning every
node), over random sequences of reports, losses and target changes (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlfleet.coordinator.routing import RoutingIndex, check
from mlfleet.coordinator.state import DeploymentRecord, NodeRecord, RouteReport, RoutingState, routes_of

pytestmark = pytest.mark.timeout(120)

NODES = [f"n{i}" for i in range(4)]
DEPS = [f"d{i}" for i in range(3)]
report = st.builds(lambda s, c, r: RouteReport(RoutingState(s), c, c, r, {"inference_count": 1}),
                   st.sampled_from([s.value for s in RoutingState]), st.integers(0, 3),
                   st.sampled_from(["", "oops"]))
step = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(NODES),
              st.dictionaries(st.sampled_from(DEPS), report, max_size=3)),
    st.tuples(st.just("lose"), st.sampled_from(NODES), st.none()),
    st.tuples(st.just("target"), st.sampled_from(DEPS),
              st.dictionaries(st.sampled_from(NODES), st.integers(0, 3), max_size=3)),
    st.tuples(st.just("stats"), st.sampled_from(NODES), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40))
def test_the_index_gives_the_routes_the_definition_gives(steps):
    nodes = {n: NodeRecord(n, n, f"tcp://{n}:1", 4, {}, {}, 1, 0.0) for n in NODES}
    deps = {d: DeploymentRecord(d, "m", 1, 1, 10, "normal", None, None, 0) for d in DEPS}
    index = RoutingIndex()

    def table():
        return {d: routes_of(dep, nodes) for d, dep in deps.items()}

    for kind, who, what in steps:
        before = table()
        index.take_dirty()
        if kind == "report":
            node = nodes[who]
            if not node.alive:  # (re-)registering: the coordinator marks what targets the node
                index.dirty |= {d for d, dep in deps.items() if who in dep.targets}
            node.alive = True
            old, node.reports = node.reports, dict(what)
            index.reports_changed(who, old, node.reports)
        elif kind == "lose":
            node = nodes[who]
            old, node.reports, node.alive = node.reports, {}, False
            index.node_gone(who, old)
            index.dirty |= {d for d, dep in deps.items() if who in dep.targets}  # as above
        elif kind == "target":
            deps[who].targets = {n: t for n, t in what.items() if t}
            index.dirty.add(who)  # the coordinator marks what it changes itself
        else:  # a heartbeat whose stats alone changed: routes unchanged, nothing dirty
            node = nodes[who]
            old = node.reports
            node.reports = {d: RouteReport(r.routing_state, r.current_allocations, r.target_allocations,
                                           r.reason, {"inference_count": 99}) for d, r in old.items()}
            index.reports_changed(who, old, node.reports)
            assert index.dirty == set()
        check(index, nodes)
        after = table()
        for d, dep in deps.items():
            assert routes_of(dep, nodes, index.reporting(d)) == after[d]
            if after[d] != before[d]:
                assert d in index.dirty, (kind, d)

"""Routing state kept in step with what changes, so a message costs what it changes.

``RoutingIndex`` knows, for each deployment, which nodes report running it (updated as reports
arrive and nodes are lost), so a deployment's routes are computed from its targets and those
nodes alone instead of a scan of every node; and it collects the deployments whose routes may
have changed since the coordinator last settled, so routing versions and waiters are looked at
only for those. ``state.routes_of`` without the index is the definition it is tested against.
"""

from __future__ import annotations

from mlfleet.coordinator.state import NodeRecord, RouteReport


def _routing_view(r: RouteReport) -> tuple[object, int, str]:
    return r.routing_state, r.current_allocations, r.reason


class RoutingIndex:
    def __init__(self) -> None:
        self.reporters: dict[str, set[str]] = {}  # deployment -> nodes whose reports name it
        self.dirty: set[str] = set()              # deployments whose routes may have changed

    def reporting(self, deployment_id: str) -> set[str]:
        return self.reporters.get(deployment_id, set())

    def reports_changed(self, node_id: str, old: dict[str, RouteReport],
                        new: dict[str, RouteReport]) -> None:
        """A node's reports were replaced: note who reports what, and what changed for routing
        (state, allocations, reason; stats alone change nothing)."""
        for dep_id in old.keys() - new.keys():
            self._drop(dep_id, node_id)
        for dep_id, rep in new.items():
            before = old.get(dep_id)
            if before is None:
                self.reporters.setdefault(dep_id, set()).add(node_id)
                self.dirty.add(dep_id)
            elif _routing_view(before) != _routing_view(rep):
                self.dirty.add(dep_id)

    def node_gone(self, node_id: str, old: dict[str, RouteReport]) -> None:
        for dep_id in old:
            self._drop(dep_id, node_id)

    def forget(self, deployment_id: str) -> None:
        self.reporters.pop(deployment_id, None)
        self.dirty.discard(deployment_id)

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def _drop(self, dep_id: str, node_id: str) -> None:
        nodes = self.reporters.get(dep_id)
        if nodes is not None:
            nodes.discard(node_id)
            if not nodes:
                del self.reporters[dep_id]
        self.dirty.add(dep_id)


def check(index: RoutingIndex, nodes: dict[str, NodeRecord]) -> None:
    """For tests: the index agrees with the reports it was told about."""
    want: dict[str, set[str]] = {}
    for node_id, node in nodes.items():
        for dep_id in node.reports:
            want.setdefault(dep_id, set()).add(node_id)
    assert want == index.reporters, (want, index.reporters)

"""Heartbeats that change nothing cost little: what a connection sent last is remembered with
the result of checking it, and a frame whose bytes are the same is not decoded and checked again.

Every agent heartbeats once a second and, in steady state, sends the same bytes each time but
for the request id (and, from a real agent, its memory figures). Decoding and checking every
value of such a frame was most of the coordinator's steady cost at 1,000 nodes. The checks stay:
a frame is trusted only to the extent that its bytes equal bytes that passed them.

* the whole frame, but for its id, equals the last one that passed (and has the same length,
  so every size limit gives the same answer; the id itself was read and checked by
  ``peek_request``): the last decoded message is used as it is;
* otherwise the frame is decoded within its op's limits as always, the body but its
  ``deployments`` checked, and of the route reports only those whose bytes are not among the
  reports of the last frame that passed (a real agent's stats move in the deployments that
  served): the list's own rule (at most MAX_REPORTS maps) and each new report's rules, which
  together are the rule of the list;
* a frame whose parts cannot be found (not a map, ``deployments`` not a list): decoded and
  checked in full.

Equal bytes are compared, never equal values: msgpack ``1`` and ``true`` decode to values that
compare equal in Python but are not the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import msgpack

from mlfleet.common import messages as m
from mlfleet.common.errors import BadRequest
from mlfleet.common.protocol import SMALL_FRAME
from mlfleet.coordinator.state import RoutingState

ParsedReports = tuple[tuple[m.RouteReport, RoutingState], ...]


@dataclass(frozen=True)
class Spans:
    rest: bytes   # the frame without the bytes of its id's value
    items: Optional[tuple[bytes, ...]]  # the bytes of each of the body's [deployments], if a list


def spans(frame: bytes | memoryview) -> Optional[Spans]:
    """The parts of a small request frame the memo compares, or None when the frame is not a
    map of string keys with a map body (such a frame is decoded in full and fails there)."""
    if len(frame) > SMALL_FRAME:
        return None
    data = bytes(frame)
    u = msgpack.Unpacker(raw=False, max_buffer_size=max(1, len(data)), strict_map_key=True)
    u.feed(data)
    id_span = None
    items: Optional[list[bytes]] = None
    try:
        for _ in range(u.read_map_header()):
            key = u.unpack()
            start = u.tell()
            if key == "id":
                u.skip()
                id_span = (start, u.tell())
            elif key == "body":
                for _ in range(u.read_map_header()):
                    if u.unpack() == "deployments":
                        items = []
                        for _ in range(u.read_array_header()):
                            s = u.tell()
                            u.skip()
                            items.append(data[s:u.tell()])
                    else:
                        u.skip()
            else:
                u.skip()
        if u.tell() != len(data) or id_span is None:
            return None
    except Exception:  # msgpack raises several unrelated types; the full decode reports it
        return None
    a, b = id_span
    return Spans(data[:a] + data[b:], tuple(items) if items is not None else None)


def parse_report(raw: Any) -> tuple[m.RouteReport, RoutingState]:
    """One route report, checked (a pure function of it)."""
    if not isinstance(raw, dict):
        raise BadRequest("[deployments] must be a list of maps")
    r = m.decode(m.RouteReport, raw, "deployments")
    try:
        state = RoutingState(r.routing_state)
    except ValueError:
        raise BadRequest(f"unknown routing_state [{r.routing_state}]") from None
    return r, state


def parse_reports(reports: list[Any]) -> ParsedReports:
    """The route reports of a register or heartbeat, each checked."""
    return tuple(parse_report(raw) for raw in reports)


@dataclass(frozen=True)
class Seen:
    size: int
    spans: Spans
    msg: m.Heartbeat
    reports: ParsedReports
    by_bytes: dict[bytes, tuple[m.RouteReport, RoutingState]]  # each report's bytes -> checked


class HeartbeatMemo:
    """What each registered connection last sent that passed the checks (one entry a
    connection: bounded by the nodes). ``hits`` and ``partial`` count the frames that reused
    all or part of an earlier check."""

    def __init__(self) -> None:
        self.seen: dict[bytes, Seen] = {}
        self.hits = self.partial = self.misses = 0

    def decode(self, ident: bytes, frame: bytes | memoryview, decode_body: Any,
               remember: bool) -> tuple[m.Heartbeat, ParsedReports]:
        """``decode_body(frame)`` decodes the request within its op's limits and returns its
        body (raising on any problem). ``remember``: whether this connection may be remembered
        (a registered node's)."""
        sp = spans(frame)
        seen = self.seen.get(ident)
        if sp is not None and seen is not None and seen.size == len(frame) and seen.spans.rest == sp.rest:
            self.hits += 1
            return seen.msg, seen.reports
        body = decode_body(frame)
        deps = body.get("deployments") if isinstance(body, dict) else None
        if sp is not None and sp.items is not None and isinstance(deps, list) and len(deps) == len(sp.items):
            # the body but its reports, then the list's rule and each report not seen last time
            msg = m.decode(m.Heartbeat, {k: v for k, v in body.items() if k != "deployments"}, "heartbeat")
            if len(deps) > m.MAX_REPORTS:
                raise BadRequest(f"[deployments] must have at most {m.MAX_REPORTS} items")
            known = seen.by_bytes if seen is not None else {}
            reports = tuple(known.get(b) or parse_report(raw) for b, raw in zip(sp.items, deps, strict=True))
            msg = m.Heartbeat(node_id=msg.node_id, memory=msg.memory, deployments=deps)
            if any(b in known for b in sp.items):
                self.partial += 1
            else:
                self.misses += 1
        else:
            self.misses += 1
            msg = m.decode(m.Heartbeat, body, "heartbeat")
            reports = parse_reports(msg.deployments)
        if sp is not None and remember:
            self.seen[ident] = Seen(len(frame), sp, msg, reports,
                                    dict(zip(sp.items, reports, strict=True)) if sp.items is not None else {})
        return msg, reports

    def forget(self, ident: bytes) -> None:
        self.seen.pop(ident, None)

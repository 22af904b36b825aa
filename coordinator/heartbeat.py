"""Heartbeats that change nothing cost little: what a connection sent last is remembered with
the result of checking it, and a frame whose bytes are the same is not decoded and checked again.

Every agent heartbeats once a second and, in steady state, sends the same bytes each time but
for the request id (and, from a real agent, its memory figures). Decoding and checking every
value of such a frame was most of the coordinator's steady cost at 1,000 nodes. The checks stay:
a frame is trusted only to the extent that its bytes equal bytes that passed them.

* the whole frame, but for its id, equals the last one that passed (and has the same length,
  so every size limit gives the same answer; the id itself was read and checked by
  ``peek_request``): the last decoded message is used as it is;
* only the body's ``deployments`` are the same bytes: the frame is decoded within its op's
  limits as always and the rest of the body checked, and the checked route reports are reused;
* otherwise: decoded and checked in full.

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
    deps: bytes   # the bytes of the body's [deployments] value (b"" when absent)


def spans(frame: bytes | memoryview) -> Optional[Spans]:
    """The parts of a small request frame the memo compares, or None when the frame is not a
    map of string keys with a map body (such a frame is decoded in full and fails there)."""
    if len(frame) > SMALL_FRAME:
        return None
    data = bytes(frame)
    u = msgpack.Unpacker(raw=False, max_buffer_size=max(1, len(data)), strict_map_key=True)
    u.feed(data)
    id_span = deps_span = None
    try:
        for _ in range(u.read_map_header()):
            key = u.unpack()
            start = u.tell()
            if key == "id":
                u.skip()
                id_span = (start, u.tell())
            elif key == "body":
                for _ in range(u.read_map_header()):
                    k = u.unpack()
                    s = u.tell()
                    u.skip()
                    if k == "deployments":
                        deps_span = (s, u.tell())
            else:
                u.skip()
        if u.tell() != len(data) or id_span is None:
            return None
    except Exception:  # msgpack raises several unrelated types; the full decode reports it
        return None
    a, b = id_span
    return Spans(data[:a] + data[b:], data[deps_span[0]:deps_span[1]] if deps_span else b"")


def parse_reports(reports: list[Any]) -> ParsedReports:
    """The route reports of a register or heartbeat, each checked (a pure function of them)."""
    out = []
    for raw in reports:
        if not isinstance(raw, dict):
            raise BadRequest("[deployments] must be a list of maps")
        r = m.decode(m.RouteReport, raw, "deployments")
        try:
            state = RoutingState(r.routing_state)
        except ValueError:
            raise BadRequest(f"unknown routing_state [{r.routing_state}]") from None
        out.append((r, state))
    return tuple(out)


@dataclass(frozen=True)
class Seen:
    size: int
    spans: Spans
    msg: m.Heartbeat
    reports: ParsedReports


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
        if sp is not None and seen is not None and sp.deps and seen.spans.deps == sp.deps \
                and isinstance(body, dict):
            self.partial += 1
            others = {k: v for k, v in body.items() if k != "deployments"}
            msg = m.decode(m.Heartbeat, others, "heartbeat")
            msg = m.Heartbeat(node_id=msg.node_id, memory=msg.memory, deployments=seen.msg.deployments)
            reports = seen.reports
        else:
            self.misses += 1
            msg = m.decode(m.Heartbeat, body, "heartbeat")
            reports = parse_reports(msg.deployments)
        if sp is not None and remember:
            self.seen[ident] = Seen(len(frame), sp, msg, reports)
        return msg, reports

    def forget(self, ident: bytes) -> None:
        self.seen.pop(ident, None)

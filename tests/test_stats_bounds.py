"""A node's stats report cannot break get_stats: epoch fields past year 9999 are refused at decode,
iso_ms never raises, and counters summed over nodes stay within msgpack's integers. Driven through
a real Coordinator with a fake clock and real frames (no sockets: its send is recorded)."""

from __future__ import annotations

import msgpack
import pytest

from mlfleet.common import messages as M
from mlfleet.common.clock import iso_ms
from mlfleet.common.protocol import encode_request
from mlfleet.coordinator.config import CoordinatorConfig
from mlfleet.coordinator.server import Coordinator
from mlfleet.coordinator.state import ModelRecord
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(60)

YEAR_9999_END_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
CLIENT = b"\x00CCCC"


@pytest.fixture
def coord(tmp_path):
    c = Coordinator(CoordinatorConfig(listen="tcp://127.0.0.1:0", data_dir=str(tmp_path / "c")),
                    clock=FakeClock())
    sent: list[tuple[bytes, dict]] = []

    def send(ident: bytes, frame: bytes | bytearray) -> bool:
        sent.append((ident, msgpack.unpackb(bytes(frame), raw=False, strict_map_key=False)))
        return True
    c._send = send  # type: ignore[method-assign]
    c.sent = sent  # type: ignore[attr-defined]
    sha = "a" * 64
    with open(c.store.model_path(sha), "wb") as f:
        f.write(b"x" * 100)
    rec = ModelRecord("m1", sha, 100, "pass_through", None, None, 0)
    c.store.save_model(rec)
    c.models["m1"] = rec
    try:
        yield c
    finally:
        c.close()


def _req(c, ident: bytes, op: str, body: dict, rid: int) -> dict:
    c.sent.clear()
    c._on_frames([ident, encode_request(op, rid, body)])
    answers = [m for i, m in c.sent if i == ident and m.get("id") == rid and "status" in m]
    assert len(answers) == 1, c.sent
    return answers[0]


MEMORY = {"total_bytes": 64 << 30, "available_bytes": 60 << 30}


def _register(c, ident: bytes, node_id: str) -> None:
    body = {"node_id": node_id, "hostname": "h", "transport_address": "tcp://127.0.0.1:1",
            "allocated_processors": 1, "cpu": {"physical": 8, "logical": 8},
            "memory": MEMORY, "pid": 1, "deployments": []}
    r = _req(c, ident, "register", body, rid=1)
    assert r["status"] == 200, r


def _heartbeat(c, ident: bytes, node_id: str, stats: dict, rid: int) -> dict:
    report = {"deployment_id": "m1", "routing_state": "started", "current_allocations": 1,
              "target_allocations": 1, "reason": "", "stats": stats}
    body = {"node_id": node_id, "memory": MEMORY, "deployments": [report]}
    return _req(c, ident, "heartbeat", body, rid=rid)


def _start(c, nodes: int) -> list[tuple[bytes, str]]:
    ids = [(b"\x00AAA%d" % i, f"n{i}") for i in range(nodes)]
    for ident, node_id in ids:
        _register(c, ident, node_id)
    r = _req(c, CLIENT, "start_deployment", {"model_id": "m1", "wait_for": "starting", "timeout": "1s",
                                             "number_of_allocations": nodes}, rid=5)
    assert r["status"] == 200, r
    assert sorted(c.deployments["m1"].targets) == [n for _, n in ids]
    return ids


def _stats(c) -> dict:
    r = _req(c, CLIENT, "get_stats", {}, rid=7)
    assert r["status"] == 200, r
    (entry,) = r["body"]["trained_model_stats"]
    return entry["deployment_stats"]


# ---- the epoch fields ---------------------------------------------------------------------------

def test_the_stats_shape_caps_epoch_fields_at_the_end_of_year_9999():
    assert M.MAX_EPOCH_MS == YEAR_9999_END_MS
    assert M.STATS_SHAPE["start_time"].rule.max == YEAR_9999_END_MS
    assert M.STATS_SHAPE["last_access"].rule.max == YEAR_9999_END_MS


@pytest.mark.parametrize("field", ["start_time", "last_access"])
@pytest.mark.parametrize("value", [YEAR_9999_END_MS + 1, 1 << 53, 2**63 - 1])
def test_an_epoch_past_year_9999_is_refused_and_get_stats_still_answers(coord, field, value):
    ((ident, node_id),) = _start(coord, 1)
    assert _heartbeat(coord, ident, node_id, {field: 1_700_000_000_000}, rid=2)["status"] == 200
    r = _heartbeat(coord, ident, node_id, {field: value}, rid=3)
    assert r["status"] == 400, r
    assert f"[stats.{field}] must be less than or equal to {YEAR_9999_END_MS}" in r["body"]["error"]["reason"]
    (node,) = _stats(coord)["nodes"]
    assert node[field] == "2023-11-14T22:13:20.000Z"  # the last report that was accepted


@pytest.mark.parametrize("field", ["start_time", "last_access"])
def test_the_last_millisecond_of_year_9999_is_accepted_and_shown(coord, field):
    ((ident, node_id),) = _start(coord, 1)
    assert _heartbeat(coord, ident, node_id, {field: YEAR_9999_END_MS}, rid=2)["status"] == 200
    (node,) = _stats(coord)["nodes"]
    assert node[field] == "9999-12-31T23:59:59.999Z"


@pytest.mark.parametrize("ms,iso", [
    (0, "1970-01-01T00:00:00.000Z"),
    (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
    (YEAR_9999_END_MS, "9999-12-31T23:59:59.999Z"),
    (YEAR_9999_END_MS + 1, "9999-12-31T23:59:59.999Z"),
    (1 << 53, "9999-12-31T23:59:59.999Z"),
    (2**63 - 1, "9999-12-31T23:59:59.999Z"),
    (2**200, "9999-12-31T23:59:59.999Z"),
    (-1, "1969-12-31T23:59:59.999Z"),
    (-62135596800000, "0001-01-01T00:00:00.000Z"),
    (-(2**63), "0001-01-01T00:00:00.000Z"),
])
def test_iso_ms_is_total_it_clamps_to_what_iso_8601_can_write(ms, iso):
    assert iso_ms(ms) == iso


# ---- counters summed over nodes -----------------------------------------------------------------

def test_counters_summed_over_nodes_are_clamped_and_get_stats_answers(coord):
    ids = _start(coord, 3)
    top = M.MAX_COUNTER
    for rid, (ident, node_id) in enumerate(ids, 10):
        stats = {k: top for k in ("inference_count", "error_count", "rejected_execution_count",
                                  "timeout_count", "peak_throughput_per_minute")}
        stats["average_inference_time_ms"] = 2.0
        assert _heartbeat(coord, ident, node_id, stats, rid=rid)["status"] == 200
    d = _stats(coord)
    for k in ("inference_count", "error_count", "rejected_execution_count", "timeout_count",
              "peak_throughput_per_minute"):
        assert d[k] == top, k
    assert d["average_inference_time_ms"] == pytest.approx(2.0)
    assert [n["inference_count"] for n in d["nodes"]] == [top] * 3


def test_sane_counters_are_summed_as_before(coord):
    ids = _start(coord, 3)
    for rid, (ident, node_id) in enumerate(ids, 10):
        i = rid - 9
        stats = {"inference_count": 10 * i, "error_count": 1, "average_inference_time_ms": float(i)}
        assert _heartbeat(coord, ident, node_id, stats, rid=rid)["status"] == 200
    d = _stats(coord)
    assert d["inference_count"] == 60 and d["error_count"] == 3
    assert d["average_inference_time_ms"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)

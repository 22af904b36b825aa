"""The agent's heartbeat frame (agent/heartbeat.py): the same bytes as encoding the whole body,
with each report built again only when it changes. Real deployment runtimes (no process is
started before a model is ready) and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from mlfleet.agent.heartbeat import ReportCache, SyncMemo
from mlfleet.agent.runtime import DeploymentRuntime
from mlfleet.common import messages as m
from mlfleet.common.protocol import (
    decode_message,
    decode_request,
    encode_reply,
    encode_reply_raw,
    encode_request,
    pack,
)
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(60)
MEMORY = {"total_bytes": 64 << 30, "available_bytes": 60 << 30}


def runtime(i: int, clock: FakeClock) -> DeploymentRuntime:
    a = m.NodeAssignment(deployment_id=f"dep-{i:04d}", model_id="tiny", sha256="a" * 64, model_bytes=10,
                         task="pass_through", threads_per_allocation=1, target_allocations=1,
                         queue_capacity=16, cache_size_bytes=0, priority="normal")

    def nothing(*_: Any) -> None:
        return None
    return DeploymentRuntime(a, node_id="n1", worker_endpoint="ipc:///nowhere", clock=clock,
                             reply=nothing, reply_payload=nothing, send_worker=nothing, schedule=nothing)


def plain(rid: int, rts: list[DeploymentRuntime], now: float) -> bytes:
    return encode_request("heartbeat", rid, {"node_id": "n1", "memory": MEMORY,
                                             "deployments": [rt.report(now) for rt in rts]})


@pytest.mark.parametrize("n", [0, 1, 15, 16, 100, 70_000])
def test_the_frame_is_the_bytes_of_the_whole_body_encoded(n: int) -> None:
    clock = FakeClock()
    one = runtime(0, clock)
    rts = [runtime(i, clock) for i in range(n)] if n < 1000 else [one] * n  # header sizes past 2^16
    cache = ReportCache()
    for rid in (1, 300, 1 << 40):
        assert cache.heartbeat(rid, "n1", MEMORY, rts, clock.t) == plain(rid, rts, clock.t)
    body = decode_request(cache.heartbeat(7, "n1", MEMORY, rts[:5], clock.t)).body
    assert m.decode(m.Heartbeat, body, "heartbeat").node_id == "n1"


def test_a_report_is_built_again_only_when_its_deployment_changed() -> None:
    clock = FakeClock()
    rts = [runtime(i, clock) for i in range(100)]
    cache = ReportCache()
    cache.heartbeat(1, "n1", MEMORY, rts, clock.t)
    assert cache.built == 100
    clock.t += 1.0
    assert cache.heartbeat(2, "n1", MEMORY, rts, clock.t) == plain(2, rts, clock.t)
    assert cache.built == 100  # nothing happened: nothing built
    rts[7].fail("the model could not be fetched")  # an event
    assert cache.heartbeat(3, "n1", MEMORY, rts, clock.t) == plain(3, rts, clock.t)
    assert cache.built == 101
    assert b"the model could not be fetched" in cache.heartbeat(4, "n1", MEMORY, rts, clock.t)


def test_the_last_minute_throughput_moves_with_the_clock() -> None:
    clock = FakeClock()
    rts = [runtime(i, clock) for i in range(3)]
    cache = ReportCache()
    rts[1].core.stats.record(clock.t, clock.wall_ms(), docs=5, time_ms=1.0, hit=False)
    cache.heartbeat(1, "n1", MEMORY, rts, clock.t)
    built = cache.built
    clock.t += 30.0
    assert cache.heartbeat(2, "n1", MEMORY, rts, clock.t) == plain(2, rts, clock.t)
    assert cache.built == built  # still 5 in the last minute
    clock.t += 31.0
    frame = cache.heartbeat(3, "n1", MEMORY, rts, clock.t)
    assert frame == plain(3, rts, clock.t)
    assert cache.built == built + 1
    assert decode_request(frame).body["deployments"][1]["stats"]["throughput_last_minute"] == 0


def test_a_deployment_started_again_is_not_answered_with_the_old_report() -> None:
    clock = FakeClock()
    old = runtime(0, clock)
    cache = ReportCache()
    cache.heartbeat(1, "n1", MEMORY, [old], clock.t)
    new = runtime(0, clock)  # the same id, a new runtime whose events count from 0 again
    old.fail("old")
    new.version = old.version
    assert cache.heartbeat(2, "n1", MEMORY, [new], clock.t) == plain(2, [new], clock.t)
    cache.heartbeat(3, "n1", MEMORY, [], clock.t)
    assert cache.heartbeat(4, "n1", MEMORY, [new], clock.t) == plain(4, [new], clock.t)


def test_a_sync_reply_with_the_body_applied_last_is_recognised_by_its_bytes() -> None:
    memo = SyncMemo()
    body = {"assignments": [{"deployment_id": f"dep-{i}", "target_allocations": 1} for i in range(100)],
            "heartbeat_interval_s": 1.0, "node_timeout_s": 10.0}
    first = encode_reply_raw(7, 200, pack(body))  # as the coordinator answers a heartbeat
    assert memo.same(first) is None  # nothing remembered yet
    memo.remember(first, 7, decode_message(first).body)
    for rid in (8, 300, 1 << 40):
        assert memo.same(encode_reply_raw(rid, 200, pack(body))) == rid
        assert memo.same(encode_reply(rid, 200, body)) == rid  # the same bytes, encoded whole
    changed = {**body, "heartbeat_interval_s": 2.0}
    assert memo.same(encode_reply_raw(9, 200, pack(changed))) is None
    assert memo.same(encode_reply_raw(9, 500, pack(body))) is None
    assert memo.same(encode_reply(9, 200, body, rv=3)) is None  # another envelope field
    assert memo.same(encode_request("sync", 0, body)) is None  # a push is decoded as usual
    assert memo.same(pack(body)) is None and memo.same(b"") is None
    assert memo.same(b"\xff" + pack(body)) is None
    memo.remember(encode_reply(10, 200, {"reregister": True}), 10, {"reregister": True})
    assert memo.same(first) is None  # only sync bodies are remembered

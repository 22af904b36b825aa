"""Faults with real processes killed by SIGKILL under load, and malformed input on every socket."""

from __future__ import annotations

import signal

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlfleet.common import PROTOCOL_VERSION
from mlfleet.common.errors import ApiError, NoAnswer
from mlfleet.common.protocol import decode_reply, encode_request
from tests.helpers import Cluster, Mlp, Stream, alloc_status, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(240)


def workers_of(c: Cluster, node: str) -> list[psutil.Process]:
    agent = psutil.Process(c.agents[node].pid)
    return [p for p in agent.children(recursive=True) if p.ppid() != agent.pid]


@pytest.fixture
def cluster_ab(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2, "node-b": 2}) as c:
        yield c


def test_killed_worker_is_restarted_and_only_its_request_fails(cluster_ab, tmp_path):
    c = cluster_ab
    with c.client() as client:
        client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
        client.start_deployment("mlp", number_of_allocations=2, wait_for="fully_allocated", cache_size="0b")
        node = next(iter(client.get_routing("mlp")["routes"]))["node_id"]
        s = Stream(client, "mlp")
        s.more(200)
        victim = workers_of(c, node)[0]
        victim.send_signal(signal.SIGKILL)
        wait_until(lambda: victim.pid not in [p.pid for p in workers_of(c, node)]
                   and len(workers_of(c, node)) == 2, 20, what="the worker restarted")
        s.more(300)
        errors = s.finish()
    assert len(errors) <= 1, errors
    for e in errors:
        assert e.status == 500 and "killed by SIGKILL while running this request" in e.reason


def test_worker_crash_loop_fails_the_route_with_its_reason(cluster_ab, tmp_path):
    c = cluster_ab
    with c.client() as client:
        client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
        client.start_deployment("mlp", wait_for="fully_allocated")
        node = client.get_routing("mlp")["routes"][0]["node_id"]
        for _ in range(4):  # the budget is 3 restarts a minute
            procs = wait_until(lambda: workers_of(c, node), 20, what="a worker to kill")
            procs[0].send_signal(signal.SIGKILL)
            wait_until(lambda procs=procs: procs[0].pid not in [p.pid for p in workers_of(c, node)], 10,
                       what="the worker gone")
        ds = wait_until(lambda: (d := client.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"])
                        ["nodes"][0]["routing_state"]["routing_state"] == "failed" and d, 20,
                        what="the route failed")
        reason = ds["nodes"][0]["routing_state"]["reason"]
        assert "exited 4 times" in reason and "SIGKILL" in reason
        with pytest.raises(ApiError):
            client.infer("mlp", [{"input": np.ones((1, 8), np.float32)}], timeout="2s")


def test_lost_agent_routes_go_and_allocations_come_back(cluster_ab, tmp_path):
    c = cluster_ab
    with c.client() as client:
        client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
        client.start_deployment("mlp", number_of_allocations=4, wait_for="fully_allocated", cache_size="0b")
        s = Stream(client, "mlp", threads=4)
        s.more(300)
        c.agents["node-b"].stop(sig=signal.SIGKILL)
        c.retired.append(c.agents.pop("node-b"))
        wait_until(lambda: set(client.get_nodes()["nodes"]) == {"node-a"}, 10, what="node-b lost")
        routes = client.get_routing("mlp")["routes"]
        assert [r["node_id"] for r in routes] == ["node-a"]
        s.more(300)
        assert alloc_status(client, "mlp")["state"] == "started"  # partially allocated: node-a is full
        c.start_agent("node-b", 2)  # it comes back and gets its allocations again
        wait_until(lambda: alloc_status(client, "mlp")["allocation_count"] == 4, 30,
                   what="4 allocations again")
        s.more(300)
        errors = s.finish()
    # only requests already sent to node-b when it died may fail, and they say so
    assert len(errors) <= 4, errors
    assert all(isinstance(e, NoAnswer) for e in errors), errors


# ---- malformed input ---------------------------------------------------------------------------

V = PROTOCOL_VERSION
NASTY = [
    [b""], [b"\x00"], [b"\xff" * 64], [b"\xc1"],  # empty, garbage, reserved msgpack byte
    [msgpack.packb([1, 2, 3])], [msgpack.packb("just a string")],
    [msgpack.packb({"v": V + 1, "op": "ping", "id": 1, "body": {}})],
    [msgpack.packb({"v": V - 1, "op": "ping", "id": 1, "body": {}})],  # the old single-frame wire
    [msgpack.packb({"v": True, "op": "ping", "id": 1})],
    [msgpack.packb({"v": V, "op": 7, "id": 1})], [msgpack.packb({"v": V, "op": "ping", "id": "x"})],
    [msgpack.packb({"v": V, "op": "no_such_op", "id": 1, "body": {}})],
    [msgpack.packb({"v": V, "op": "start_deployment", "id": 1, "body": {"model_id": 5}})],
    [msgpack.packb({"v": V, "op": "start_deployment", "id": 1, "body": []})],
    [msgpack.packb({"v": V, "op": "infer", "id": 1, "body": {"deployment_id": "x", "docs": "no"}})],
    [msgpack.packb({"v": V, "op": "infer", "id": 1, "body": {"deployment_id": "x"}})],  # no payload
    [msgpack.packb({"v": V, "op": "register", "id": 1, "body": {"node_id": "evil"}})],
    [msgpack.packb({"v": V, "op": "get_stats", "id": 1, "body": {"deployment_id": {"$gt": 1}}})],
    [msgpack.packb({"v": V, "op": "ping", "id": 1, "body": {}})[:-3]],  # truncated
    [b"a", b"b", b"c"],  # a header that is not one, and frames after it
]


def _probe(endpoint: str, frames: list[bytes]) -> object:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(frames)
        if s.poll(3000):
            return decode_reply(s.recv())
        return None
    finally:
        s.close(0)


def _alive(endpoint: str) -> bool:
    rep = _probe(endpoint, [encode_request("ping", 99, {})])
    return rep is not None and rep.status == 200 and rep.id == 99


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("fuzz"), {"node-a": 1}) as c:
        yield c


def test_fixed_corpus_of_nasty_messages_gets_400_and_daemons_keep_serving(small_cluster):
    for endpoint in (small_cluster.coordinator.endpoint, small_cluster.agents["node-a"].endpoint):
        for frames in NASTY:
            rep = _probe(endpoint, frames)
            if rep is not None:
                assert rep.status in (400, 404), (frames, rep)
                assert rep.body["status"] == rep.status and rep.body["error"]["reason"]
            assert _alive(endpoint), frames
    # oversized: past MAXMSGSIZE the connection is dropped, the daemon goes on
    from mlfleet.common.protocol import MAX_MESSAGE_BYTES
    assert _probe(small_cluster.coordinator.endpoint, [b"x" * (MAX_MESSAGE_BYTES + 1)]) is None
    assert _alive(small_cluster.coordinator.endpoint)
    for d in (small_cluster.coordinator, *small_cluster.agents.values()):
        assert d.proc.poll() is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=256),
    st.dictionaries(st.sampled_from(["v", "op", "id", "body", "x"]),
                    st.one_of(st.integers(-5, 5), st.text(max_size=12), st.binary(max_size=8), st.none(),
                              st.booleans(), st.lists(st.integers(-2**40, 2**40), max_size=3),
                              st.dictionaries(st.text(max_size=8), st.integers(-2**40, 2**40), max_size=3)),
                    max_size=5).map(lambda d: msgpack.packb(d, use_bin_type=True))))
def test_generated_messages_never_take_a_daemon_down(small_cluster, frame):
    for endpoint in (small_cluster.coordinator.endpoint, small_cluster.agents["node-a"].endpoint):
        rep = _probe(endpoint, [frame])
        if rep is not None:
            assert rep.status >= 400 or rep.body is not None
    assert small_cluster.coordinator.proc.poll() is None
    assert small_cluster.agents["node-a"].proc.poll() is None
    assert _alive(small_cluster.coordinator.endpoint)

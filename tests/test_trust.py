"""Trust boundaries with CURVE on: a rogue agent key cannot steer the cluster, node ids move
between keys only by an admin, nobody can take or hold another peer's name, and an agent's key
is rotated under load without a failed request. Real daemons on loopback with CURVE forced."""

from __future__ import annotations

import os
import signal

import msgpack
import numpy as np
import pytest
import zmq

from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import decode_reply, encode_request
from mlfleet.common.security import generate_keys, load_public, load_secret
from tests.helpers import Cluster, Mlp, Stream, save_model, wait_until

pytestmark = pytest.mark.timeout(240)
X = np.ones((1, 8), np.float32)


class Keys:
    def __init__(self, d) -> None:
        self.dir = d / "keys"
        self.files = {n: generate_keys(n, self.dir) for n in
                      ("coordinator", "agent-a", "agent-a2", "rogue", "admin")}
        self.z85 = {n: load_public(pub).decode() for n, (_, pub) in self.files.items()}
        self.authorized = d / "authorized_keys"
        self.authorized.write_text(f"admin {self.z85['admin']}\nagent {self.z85['agent-a']}\n"
                                   f"agent {self.z85['rogue']}\n")

    def secret(self, name):
        return str(self.files[name][0])

    def public(self, name):
        return str(self.files[name][1])


def _agent_args(keys: Keys, name: str) -> list[str]:
    return ["--curve-secret-key", keys.secret(name), "--coordinator-public-key", keys.public("coordinator")]


@pytest.fixture
def secure(tmp_path):
    keys = Keys(tmp_path)
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(extra=["--curve-secret-key", keys.secret("coordinator"),
                                   "--authorized-keys", str(keys.authorized)])
        yield c, keys
    finally:
        assert not c.shutdown()


def _admin(c: Cluster, keys: Keys, **kw):
    return c.client(secret_key=keys.secret("admin"), server_public_key=keys.public("coordinator"), **kw)


class RawAgent:
    """A peer speaking the agent protocol by hand, with a given key (and optionally a routing id
    of its own choosing)."""

    def __init__(self, c: Cluster, keys: Keys, key: str, routing_id: bytes | None = None) -> None:
        pub, sec = load_secret(keys.secret(key))
        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        if routing_id:
            self.s.setsockopt(zmq.ROUTING_ID, routing_id)
        self.s.curve_publickey, self.s.curve_secretkey = pub, sec
        self.s.curve_serverkey = load_public(keys.public("coordinator"))
        self.s.connect(c.coordinator.endpoint)
        self.rid = 0

    def call(self, op: str, body: dict, wait_ms: int = 5000):
        self.rid += 1
        self.s.send(encode_request(op, self.rid, body))
        while True:  # pushes (sync) may come before the reply
            if not self.s.poll(wait_ms):
                return None
            msg = msgpack.unpackb(self.s.recv(), raw=False)
            if "status" in msg and msg.get("id") == self.rid:
                return decode_reply(msgpack.packb(msg, use_bin_type=True))

    def close(self) -> None:
        self.s.close(0)


def _register_body(node_id: str, processors: int = 2, **over) -> dict:
    body = {"node_id": node_id, "hostname": "rogue", "transport_address": "tcp://127.0.0.1:9",
            "allocated_processors": processors, "cpu": {"physical": 1, "logical": 1},
            "memory": {"total_bytes": 1 << 34, "available_bytes": 1 << 33}, "pid": os.getpid(),
            "deployments": []}
    body.update(over)
    return body


def test_a_rogue_agent_cannot_steer_the_cluster(secure):
    c, keys = secure
    c.start_agent("node-a", 2, extra=_agent_args(keys, "agent-a"))
    with _admin(c, keys) as admin:
        wait_until(lambda: len(admin.get_nodes()["nodes"]) == 1, 30, what="node-a")
        admin.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
        admin.start_deployment("mlp", wait_for="started")
        sha = admin.get_models("mlp")["trained_model_configs"][0]["sha256"]
        rogue = RawAgent(c, keys, "rogue")
        try:
            # junk values are refused before anything is stored, and bind nothing to the key
            rep = rogue.call("register", _register_body("junk-node", memory={"total_bytes": "x",
                                                                               "available_bytes": 1}))
            assert rep.status == 400, rep
            rep = rogue.call("register", _register_body("huge", processors=10**6))
            assert rep.status == 400, rep
            assert "junk-node" not in admin.get_nodes()["nodes"]
            # a registered rogue claims a deployment it was not given, a failed route for it, and
            # more allocations than exist: none of it counts
            assert rogue.call("register", _register_body("rogue-node")).status == 200
            lie = {"deployment_id": "mlp", "routing_state": "started", "current_allocations": 1000,
                   "target_allocations": 1000, "reason": "", "stats": {}}
            for state in ("started", "failed"):
                rep = rogue.call("heartbeat", {"node_id": "rogue-node", "memory": {
                    "total_bytes": 1 << 34, "available_bytes": 1 << 33},
                    "deployments": [dict(lie, routing_state=state)]})
                assert rep.status == 200
                routing = admin.get_routing("mlp")
                assert [r["node_id"] for r in routing["routes"]] == ["node-a"], routing
                stats = admin.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
                assert stats["state"] == "started" and [
                    next(iter(n["node"])) for n in stats["nodes"]] == ["node-a"]
            # model bytes only go to nodes that run the model
            rep = rogue.call("model_chunk", {"sha256": sha, "offset": 0, "length": 1024})
            assert rep.status == 403, rep
            # the cluster keeps planning and routing: a new deployment lands, answers
            admin.start_deployment("mlp", deployment_id="mlp-2", wait_for="started")
            assert admin.infer("mlp-2", [{"input": X}])["inference_results"]
        finally:
            rogue.close()


def test_the_rogue_node_gets_only_what_it_was_given(secure):
    """A rogue with many processors attracts deployments (it is an agent after all), but its
    reports never count for more allocations than it was given."""
    c, keys = secure
    with _admin(c, keys) as admin:
        admin.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
        rogue = RawAgent(c, keys, "rogue")
        try:
            assert rogue.call("register", _register_body("rogue-node", processors=8)).status == 200
            admin.start_deployment("mlp", number_of_allocations=2, wait_for="starting")
            claim = {"deployment_id": "mlp", "routing_state": "started", "current_allocations": 500,
                     "target_allocations": 500, "reason": "", "stats": {}}
            rogue.call("heartbeat", {"node_id": "rogue-node", "memory": {
                "total_bytes": 1 << 34, "available_bytes": 1 << 33}, "deployments": [claim]})
            routes = admin.get_routing("mlp")["routes"]
            assert routes and all(r["current_allocations"] <= 2 for r in routes), routes
        finally:
            rogue.close()


def test_nobody_can_take_or_hold_an_agents_name(secure):
    c, keys = secure
    # before the agent starts: a peer choosing its own routing id (the name the old protocol
    # gave agents) is not served, so it registers nothing
    squatter = RawAgent(c, keys, "rogue", routing_id=b"agent/node-a")
    try:
        rep = squatter.call("register", _register_body("node-a"), wait_ms=2000)
        assert rep.status == 400 and "routing id" in rep.body["error"]["reason"]
    finally:
        squatter.close()
    c.start_agent("node-a", 2, extra=_agent_args(keys, "agent-a"))
    with _admin(c, keys) as admin:
        wait_until(lambda: "node-a" in admin.get_nodes()["nodes"], 30, what="the real node-a")
        admin.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
        admin.start_deployment("mlp", wait_for="started")
        # while it runs: another agent key cannot take the node id, nor its routing id
        rogue = RawAgent(c, keys, "rogue")
        try:
            rep = rogue.call("register", _register_body("node-a"))
            assert rep.status == 403 and "another agent key" in rep.body["error"]["reason"]
        finally:
            rogue.close()
        for rid in (b"agent/node-a", b"node-a"):
            squatter = RawAgent(c, keys, "rogue", routing_id=rid)
            try:
                rep = squatter.call("heartbeat", {"node_id": "node-a", "memory": {
                    "total_bytes": 1, "available_bytes": 1}}, wait_ms=3000)
                assert rep.status == 400, rep
            finally:
                squatter.close()
        assert [r["node_id"] for r in admin.get_routing("mlp")["routes"]] == ["node-a"]
        assert admin.infer("mlp", [{"input": X}])["inference_results"]
        # while it restarts: its node id stays its own
        c.agents["node-a"].stop(signal.SIGKILL)
        c.retired.append(c.agents.pop("node-a"))
        rogue = RawAgent(c, keys, "rogue")
        try:
            assert rogue.call("register", _register_body("node-a")).status == 403
        finally:
            rogue.close()
        c.start_agent("node-a", 2, extra=_agent_args(keys, "agent-a"))
        wait_until(lambda: admin.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
                   ["allocation_status"]["state"] == "fully_allocated", 60, what="node-a back")
        assert admin.infer("mlp", [{"input": X}])["inference_results"]


def test_an_agent_key_is_rotated_under_load_without_a_failed_request(secure):
    c, keys = secure
    c.start_agent("node-a", 2, extra=_agent_args(keys, "agent-a"))
    with _admin(c, keys) as admin:
        wait_until(lambda: "node-a" in admin.get_nodes()["nodes"], 30, what="node-a")
        admin.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
        admin.start_deployment("mlp", wait_for="started")
        with _admin(c, keys, request_timeout="60s") as loader:
            load = Stream(loader, "mlp", threads=2, timeout="30s")
            try:
                load.more(20)
                # the new key is authorized (the coordinator reads the file again), the node id
                # is moved to it, and the agent restarts with it
                keys.authorized.write_text(keys.authorized.read_text() + f"agent {keys.z85['agent-a2']}\n")
                body = wait_until(
                    lambda: _try(lambda: admin.rotate_node_key("node-a", keys.public("agent-a2"))),
                    20, what="the rotation accepted")
                assert body["public_key"] == keys.z85["agent-a2"]
                assert body["previous_public_key"] == keys.z85["agent-a"]
                load.more(10)
                c.agents["node-a"].stop(signal.SIGTERM)  # a clean leave: routes go first
                c.retired.append(c.agents.pop("node-a"))
                c.start_agent("node-a", 2, extra=_agent_args(keys, "agent-a2"))
                load.more(50, timeout_s=90)
            finally:
                failures = load.finish()
        assert failures == [], failures[:5]
        nodes = admin.get_nodes()["nodes"]
        assert list(nodes) == ["node-a"]
    # the old key can no longer register the node
    old = RawAgent(c, keys, "agent-a")
    try:
        rep = old.call("register", _register_body("node-a"))
        assert rep.status == 403
    finally:
        old.close()


def _try(fn):
    try:
        return fn()
    except ApiError:
        return None

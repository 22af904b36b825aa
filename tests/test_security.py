"""The full cluster with CURVE forced on loopback: every role against every action."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq

from mlfleet.common.errors import Forbidden, NoAnswer, Unauthorized
from mlfleet.common.protocol import decode_reply, encode_request, encode_tree
from mlfleet.common.security import generate_keys, load_public, load_secret
from tests.helpers import ROOT, Cluster, Mlp, save_model, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    d = tmp_path_factory.mktemp("secure")
    keys = {name: generate_keys(name, d / "keys") for name in
            ("coordinator", "agent-a", "agent-b", "admin", "reader", "stranger")}
    z85 = {name: load_public(pub).decode() for name, (_, pub) in keys.items()}
    (d / "authorized_keys").write_text(f"# role key\nadmin {z85['admin']}\ninfer {z85['reader']}\n"
                                       f"agent {z85['agent-a']}\nagent {z85['agent-b']}\n")
    c = Cluster(d)
    try:
        c.start_coordinator(extra=["--curve-secret-key", str(keys["coordinator"][0]),
                                   "--authorized-keys", str(d / "authorized_keys")])
        c.start_agent("node-a", 2, extra=["--curve-secret-key", str(keys["agent-a"][0]),
                                          "--coordinator-public-key", str(keys["coordinator"][1])])
        coord_pub = str(keys["coordinator"][1])

        def client(name):
            return c.client(secret_key=str(keys[name][0]), server_public_key=coord_pub)
        with client("admin") as admin:
            wait_until(lambda: len(admin.get_nodes()["nodes"]) == 1, 30, what="the agent over CURVE")
            admin.put_model("mlp", save_model(Mlp(), d / "mlp.pt"))
            admin.start_deployment("mlp", wait_for="started")
        yield c, client, keys
    finally:
        assert not c.shutdown()


X = np.ones((1, 8), np.float32)


def test_admin_may_do_everything(secure):
    c, client, _ = secure
    with client("admin") as admin:
        assert admin.infer("mlp", [{"input": X}])["inference_results"]
        admin.start_deployment("mlp", deployment_id="extra", wait_for="started")
        assert admin.clear_cache("extra") == {"cleared": True}
        assert admin.stop_deployment("extra") == {"stopped": True}
        assert admin.get_stats("mlp")["count"] == 1


def test_infer_role_may_infer_and_read_but_not_change(secure):
    _, client, _ = secure
    with client("reader") as reader:
        assert reader.infer("mlp", [{"input": X}])["inference_results"]
        assert reader.get_stats("mlp")["count"] == 1
        assert "node-a" in reader.get_nodes()["nodes"]
        assert reader.get_models()["count"] == 1
        for action in (lambda: reader.start_deployment("mlp", deployment_id="nope"),
                       lambda: reader.update_deployment("mlp", number_of_allocations=2),
                       lambda: reader.stop_deployment("mlp"),
                       lambda: reader.clear_cache("mlp"),
                       lambda: reader.delete_model("mlp"),
                       lambda: reader.put_model("m2", __file__)):
            with pytest.raises(Forbidden) as e:
                action()
            assert e.value.status == 403 and e.value.type == "security_exception"
            assert "is unauthorized for a key with role [infer]" in e.value.reason


def test_agent_key_cannot_act_as_a_client(secure):
    _, client, _ = secure
    with client("agent-a") as agent_as_client:
        with pytest.raises(Forbidden, match=r"role \[agent\]"):
            agent_as_client.get_stats()
        with pytest.raises(Forbidden):
            agent_as_client.start_deployment("mlp", deployment_id="evil")


def test_unknown_key_gets_401_from_coordinator_and_agent(secure):
    c, client, keys = secure
    with client("stranger") as stranger:
        with pytest.raises(Unauthorized) as e:
            stranger.get_stats()
        assert e.value.status == 401 and e.value.type == "security_exception"
    # straight to the agent's inference endpoint with an unknown key
    with client("admin") as admin:
        route = admin.get_routing("mlp")["routes"][0]
    pub, sec = load_secret(keys["stranger"][0])
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey = pub, sec
    s.curve_serverkey = route["public_key"].encode()
    s.connect(route["address"])
    try:
        s.send(encode_request("infer", 5, {"deployment_id": "mlp", "docs": encode_tree([{"input": X}])}))
        assert s.poll(5000)
        rep = decode_reply(s.recv())
        assert rep.status == 401 and rep.id == 5
    finally:
        s.close(0)


def test_no_key_fails_fast_with_a_clear_error(secure):
    """The transport knows the handshake failed: the client says why, well within its timeout."""
    c, client, keys = secure
    with c.client(request_timeout="20s") as plain:
        with pytest.raises(NoAnswer, match="requires CURVE keys and this client has none") as e:
            plain.get_stats()  # said by the handshake: the 20 s timeout would say "no answer within"
        assert "mlfleet keys generate" in e.value.reason and "secret_key" in e.value.reason
    wrong = generate_keys("wrong-server", keys["admin"][0].parent.parent / "other")[1]
    with c.client(secret_key=str(keys["admin"][0]), server_public_key=str(wrong)) as mistaken:
        with pytest.raises(NoAnswer, match="CURVE handshake with .* failed"):
            mistaken.get_stats()


def test_non_loopback_without_keys_is_refused():
    p = subprocess.run([sys.executable, "-m", "mlfleet", "coordinator", "--listen", "tcp://0.0.0.0:0",
                        "--data-dir", "/tmp/mlfleet-refused"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert p.returncode == 2
    assert "mlfleet keys generate" in p.stderr


@contextlib.contextmanager
def _dealer_with_key(c, keys, key: str):
    """A DEALER to the coordinator with the CURVE key pair ``keys[key]``, closed on exit."""
    pub, sec = load_secret(keys[key][0])
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, load_public(keys["coordinator"][1])
    s.connect(c.coordinator.endpoint)
    try:
        yield s
    finally:
        s.close(0)


def test_a_node_id_stays_with_the_agent_key_that_registered_it(secure):
    c, _, keys = secure

    def register(key: str, node_id: str):
        with _dealer_with_key(c, keys, key) as s:
            s.send(encode_request("register", 1, {
                "node_id": node_id, "hostname": "h", "transport_address": "tcp://127.0.0.1:1",
                "allocated_processors": 1, "cpu": {"physical": 1, "logical": 1},
                "memory": {"total_bytes": 1 << 30, "available_bytes": 1 << 29}, "pid": 1}))
            while True:  # a sync push may come before the reply
                assert s.poll(5000)
                msg = msgpack.unpackb(s.recv(), raw=False)
                if "status" in msg:
                    return decode_reply(msgpack.packb(msg, use_bin_type=True))
    assert register("agent-a", "node-x").status == 200
    stolen = register("agent-b", "node-x")
    assert stolen.status == 403 and "registered to another agent key" in stolen.body["error"]["reason"]


def test_a_bulk_request_from_another_agent_key_is_refused(secure):
    """The agent's bulk connection is authenticated like its main one: another agent key, even
    one that knew the node's token, gets 403; an infer key may not ask for model bytes at all.
    (The deployment of the fixture was fetched over node-a's CURVE bulk connection.)"""
    c, client, keys = secure
    with client("admin") as admin:
        sha = admin.get_models("mlp")["trained_model_configs"][0]["sha256"]

    def chunk(key: str) -> object:
        with _dealer_with_key(c, keys, key) as s:
            s.send(encode_request("model_chunk", 3, {"sha256": sha, "offset": 0, "length": 1024,
                                                     "node_id": "node-a", "bulk_token": "0" * 32}))
            assert s.poll(5000)
            return decode_reply(s.recv())
    other = chunk("agent-b")
    assert other.status == 403 and "registered to another agent key" in other.body["error"]["reason"]
    reader = chunk("reader")
    assert reader.status == 403 and "role [infer]" in reader.body["error"]["reason"]
    with client("admin") as admin:
        assert admin.get_nodes()["nodes"]["node-a"]["deployments"] == ["mlp"]

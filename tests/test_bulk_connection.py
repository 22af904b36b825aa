"""Liveness first on the agent's side: model bytes travel on a connection of their own.

A real coordinator and a real agent, with a ZeroMQ proxy between them in this process. The
proxy gives each of the agent's connections a connection of its own to the coordinator and, like
a TCP connection, delivers each connection's replies in order: while it holds a ``model_chunk``
reply (a slow link for bulk bytes), every later reply on that connection waits behind it. The
agent's heartbeats must still be answered while its fetch is held: they cannot share a
connection with the chunks.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
import zmq

from mlfleet.common.protocol import MAX_MESSAGE_BYTES, decode_reply, encode_request, peek_request, unpack
from tests.helpers import Cluster, alloc_status, big_archive, wait_until

pytestmark = pytest.mark.timeout(120)


class FifoProxy(threading.Thread):
    """agent DEALERs -> our ROUTER -> one DEALER per agent connection -> the coordinator."""

    def __init__(self, coordinator: str) -> None:
        super().__init__(daemon=True)
        self.coordinator = coordinator
        self.ctx = zmq.Context()
        self.front = self._socket(zmq.ROUTER)
        self.endpoint = f"tcp://127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"
        self.backs: dict[bytes, zmq.Socket] = {}       # agent connection -> ours to the coordinator
        self.conn_of: dict[zmq.Socket, bytes] = {}
        self.ops: dict[tuple[bytes, int], str] = {}    # (connection, request id) -> op
        self.held: dict[bytes, collections.deque] = collections.defaultdict(collections.deque)
        self.holding = True                            # hold model_chunk replies until release()
        self.chunks_held = 0
        self.chunk_connections: set[bytes] = set()
        self.heartbeat_connections: set[bytes] = set()
        self.answered_while_held: list[float] = []    # heartbeat replies delivered while a chunk was held
        self._release = threading.Event()
        self.stop = threading.Event()

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        return s

    def release(self) -> None:
        self._release.set()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self.stop.is_set():
            if self._release.is_set() and self.holding:
                self.holding = False
                for conn, q in self.held.items():
                    while q:
                        self.front.send_multipart([conn, q.popleft()])
            for sock, _ in poller.poll(20):
                if sock is self.front:
                    conn, frame = self.front.recv_multipart()
                    back = self.backs.get(conn)
                    if back is None:
                        back = self.backs[conn] = self._socket(zmq.DEALER)
                        back.connect(self.coordinator)
                        self.conn_of[back] = conn
                        poller.register(back, zmq.POLLIN)
                    op, rid = peek_request(frame)
                    self.ops[(conn, rid)] = op
                    if op == "model_chunk":
                        self.chunk_connections.add(conn)
                    elif op == "heartbeat":
                        self.heartbeat_connections.add(conn)
                    back.send(frame)
                else:
                    conn = self.conn_of[sock]
                    frame = sock.recv()
                    msg = unpack(frame)
                    op = self.ops.pop((conn, msg.get("id")), "") if "status" in msg else "push"
                    if self.holding and (op == "model_chunk" or self.held[conn]):
                        self.chunks_held += op == "model_chunk"
                        self.held[conn].append(frame)  # in order, like the bytes of a connection
                        continue
                    if op == "heartbeat" and self.chunks_held and any(self.held.values()):
                        self.answered_while_held.append(time.monotonic())
                    self.front.send_multipart([conn, frame])
        for s in [self.front, *self.backs.values()]:
            s.close(0)
        self.ctx.term()


def test_heartbeats_are_answered_while_the_agent_fetches_a_model(tmp_path, mlp_path):
    c = Cluster(tmp_path)
    proxy = None
    try:
        coord = c.start_coordinator(extra=["--node-timeout", "20s"])
        proxy = FifoProxy(coord.endpoint)
        proxy.start()
        coord.endpoint = proxy.endpoint  # the agent is pointed at the proxy; clients are not
        try:
            c.start_agent("node-a", 2)
        finally:
            coord.endpoint = proxy.coordinator
        c.wait_nodes(1)
        with c.client() as client:
            client.put_model("mlp", mlp_path)
            client.start_deployment("mlp", deployment_id="d", wait_for="starting", timeout="30s")
            wait_until(lambda: proxy.chunks_held >= 1, 30, 0.02, what="the agent to ask for a model chunk")
            # the fetch cannot finish while its chunk is held; heartbeats (every 200 ms) go on
            wait_until(lambda: len(proxy.answered_while_held) >= 3, 8, 0.02,
                       what="3 heartbeats of the fetching agent to be answered while its chunk is held")
            assert alloc_status(client, "d")["state"] != "fully_allocated"
            assert proxy.chunk_connections.isdisjoint(proxy.heartbeat_connections), \
                "model chunks and heartbeats travelled on one connection"
            proxy.release()
            wait_until(lambda: alloc_status(client, "d")["state"] == "fully_allocated", 60, 0.1,
                       what="the deployment to start once its chunk is let through")
    finally:
        if proxy is not None:
            proxy.stop.set()
            proxy.join(10)
        leftovers = c.shutdown()
        assert not leftovers, f"processes outlived their daemons: {leftovers}"


def _ask(sock: zmq.Socket, op: str, body: dict, rid: int) -> tuple[int, dict]:
    """Send a request; its reply (pushes that come first are passed over)."""
    sock.send(encode_request(op, rid, body))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert sock.poll(10_000), f"no answer to [{op}] within 10 s"
        frame = sock.recv()
        if "op" in unpack(frame):
            continue
        rep = decode_reply(frame)
        assert rep.id == rid
        return rep.status, rep.body
    raise AssertionError(f"no answer to [{op}] within 10 s")


def test_a_bulk_request_without_a_registration_is_refused_and_the_daemons_go_on(fresh_cluster, mlp_path):
    c = fresh_cluster
    c.start_coordinator()
    c.start_agent("node-a", 2)
    c.wait_nodes(1)
    with c.client() as client:
        sha = client.put_model("mlp", mlp_path)["sha256"]
        client.start_deployment("mlp", deployment_id="d", wait_for="started", timeout="60s")
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(c.coordinator.endpoint)
    try:
        chunk = {"sha256": sha, "offset": 0, "length": 1 << 20}
        # a node that is not registered: nothing to attach the connection to
        status, body = _ask(stranger, "model_chunk", {**chunk, "node_id": "ghost",
                                                      "bulk_token": "0" * 32}, 1)
        assert status == 503, body
        assert "node [ghost] is not registered" in body["error"]["reason"]
        # a registered node, but not the token its registration was given
        status, body = _ask(stranger, "model_chunk", {**chunk, "node_id": "node-a",
                                                      "bulk_token": "0" * 32}, 2)
        assert status == 403, body
        assert "[bulk_token]" in body["error"]["reason"] and "node [node-a]" in body["error"]["reason"]
        # half of the credentials
        status, body = _ask(stranger, "model_chunk", {**chunk, "node_id": "node-a"}, 3)
        assert status == 400, body
        assert "[node_id] and [bulk_token]" in body["error"]["reason"]
        # no credentials, from a connection that did not register: as before
        status, body = _ask(stranger, "model_chunk", chunk, 4)
        assert status == 503 and "register first" in body["error"]["reason"], body
        # a malformed token
        status, body = _ask(stranger, "model_chunk", {**chunk, "node_id": "node-a", "bulk_token": 7}, 5)
        assert status == 400 and "[bulk_token]" in body["error"]["reason"], body
        status, body = _ask(stranger, "ping", {}, 6)
        assert status == 200
        with c.client() as client:
            assert "node-a" in client.get_nodes()["nodes"]
            assert alloc_status(client, "d")["state"] == "fully_allocated"
        assert c.coordinator.proc.poll() is None and c.agents["node-a"].proc.poll() is None
    finally:
        stranger.close(0)
        ctx.term()


def _register(ctx: zmq.Context, endpoint: str, node_id: str) -> tuple[zmq.Socket, str]:
    """A hand-made agent: registers over a DEALER of its own; its socket and bulk token."""
    main = ctx.socket(zmq.DEALER)
    main.setsockopt(zmq.LINGER, 0)
    main.connect(endpoint)
    main.send(encode_request("register", 1, {
        "node_id": node_id, "hostname": "h", "transport_address": "tcp://127.0.0.1:1",
        "allocated_processors": 4, "cpu": {"physical": 4, "logical": 4},
        "memory": {"total_bytes": 8 << 30, "available_bytes": 4 << 30}, "pid": 1}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a sync push comes before the reply
        assert main.poll(10_000), "no answer to [register]"
        msg = unpack(main.recv())
        if "status" in msg:
            assert msg["status"] == 200, msg
            return main, msg["body"]["bulk_token"]
    raise AssertionError("no reply to [register] within 10 s")


def test_a_lost_bulk_connection_costs_only_its_replies(fresh_cluster, tmp_path):
    """Nothing is kept per bulk connection: one that goes away with chunk replies owed leaves
    the coordinator serving (the replies are dropped), and a new one (another routing id) is
    served with the same token, no handshake."""
    c = fresh_cluster
    c.start_coordinator()
    ctx = zmq.Context()
    main, token = _register(ctx, c.coordinator.endpoint, "hand-node")
    try:
        with c.client() as client:
            sha = client.put_model("big", big_archive(tmp_path / "big.pt", 16 << 20))["sha256"]
            client.start_deployment("big", deployment_id="d", wait_for="starting", timeout="30s")
        ask = {"sha256": sha, "offset": 0, "length": 4 << 20, "node_id": "hand-node", "bulk_token": token}
        gone = ctx.socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 0)
        gone.connect(c.coordinator.endpoint)
        for rid in range(1, 41):  # 160 MiB asked for, served one chunk at a time
            gone.send(encode_request("model_chunk", rid, {**ask, "offset": (rid % 4) << 22}))
        assert gone.poll(10_000), "no chunk reply within 10 s"
        gone.close(0)  # with replies owed: the coordinator's sends find no peer
        bulk = ctx.socket(zmq.DEALER)
        bulk.setsockopt(zmq.LINGER, 0)
        bulk.connect(c.coordinator.endpoint)
        try:
            # the gone connection's owed chunks still count against the node's cap until they
            # are read and dropped: until then a 503 naming the limit, and the agent asks again
            # after a backoff (agent/modelcache.py), as here
            deadline, rid, backoff = time.monotonic() + 60, 100, 0.05
            while True:
                status, body = _ask(bulk, "model_chunk", ask, rid)
                if status != 503 or time.monotonic() > deadline:
                    break
                assert "MAX_CHUNKS_PER_NODE" in body["error"]["reason"], body
                rid += 1
                time.sleep(backoff)  # the agent's retry backoff, not a synchronisation
                backoff = min(1.0, backoff * 2)
            assert status == 200 and len(body["data"]) == 4 << 20, status
            status, _ = _ask(main, "ping", {}, rid + 1)
            assert status == 200 and c.coordinator.proc.poll() is None
        finally:
            bulk.close(0)
    finally:
        main.close(0)
        ctx.term()


def test_a_bulk_byte_rate_paces_model_chunks_and_the_fetch_completes(tmp_path):
    """--bulk-max-bytes-per-sec (Elasticsearch paces shard recoveries the same way): at 1 MiB/s a
    model of three 4 MiB chunks cannot reach an agent in less than 8 s (the second chunk starts 4
    s after the first, the third 4 s after that); unpaced it takes a fraction of that. The node
    stays alive throughout and the deployment starts."""
    import numpy as np
    import torch

    from tests.helpers import Mlp, running_cluster, save_model
    model = save_model(torch.nn.Linear(1500, 1500), tmp_path / "big.pt")  # 9 MB: chunks 4+4+0.6 MiB
    assert 8 << 20 < model.stat().st_size < 12 << 20
    with running_cluster(tmp_path, {"node-a": 1},
                         coordinator_extra=["--bulk-max-bytes-per-sec", "1mb"]) as c, c.client() as client:
        client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
        client.put_model("big", model)
        t0 = time.monotonic()
        client.start_deployment("big", wait_for="started", timeout="60s")
        elapsed = time.monotonic() - t0
        assert elapsed >= 7.5, elapsed
        out = client.infer("big", [{"input": np.ones((1, 1500), np.float32)}])
        assert len(out["inference_results"][0]["predicted_value"][0]) == 1500
        assert list(client.get_nodes()["nodes"]) == ["node-a"]

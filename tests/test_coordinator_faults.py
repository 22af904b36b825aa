"""The coordinator against hostile or broken input: agents that ask for model bytes and never
read them, a disk that fails under a write, a damaged state file, agents that report or register
what they should not.

Real parts: a real Coordinator on loopback sockets (run on a thread of this process), real
DEALER sockets for agents and clients, real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from mlfleet.common.protocol import encode_request
from mlfleet.coordinator import server as server_mod
from mlfleet.coordinator.config import CoordinatorConfig
from mlfleet.coordinator.server import Coordinator
from mlfleet.coordinator.state import ModelRecord
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

SHA = "b" * 64
CHUNK = 8 << 20


class Running:
    """A real coordinator serving on loopback from a thread; ``close`` stops and joins it."""

    def __init__(self, data_dir: str, model_bytes: int = CHUNK, clock: Any = None, **cfg: Any) -> None:
        # SQLite wants its connection used on the thread that made it: the loop's thread
        self.error: BaseException | None = None
        ready = threading.Event()

        def serve() -> None:
            try:
                self.c = Coordinator(CoordinatorConfig(listen="tcp://127.0.0.1:0", data_dir=data_dir, **cfg),
                                     clock=clock)
                path = self.c.store.model_path(SHA)
                if not path.exists():
                    with open(path, "wb") as f:
                        f.write(os.urandom(model_bytes))
                    rec = ModelRecord("m1", SHA, model_bytes, "pass_through", None, None, 0)
                    self.c.store.save_model(rec)
                    self.c.models["m1"] = rec
                self.endpoint = self.c.bind()
            except BaseException as e:  # told to the test's thread
                self.error = e
                return
            finally:
                ready.set()
            self.c.run()
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the coordinator did not start"
        if self.error is not None:
            raise AssertionError(f"the coordinator did not start: {self.error!r}")
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []

    def dealer(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        self.socks.append(s)
        return s

    def close(self) -> None:
        self.c.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the coordinator's loop did not stop"
        for s in self.socks:
            s.close(0)
        self.ctx.term()


def call(s: zmq.Socket, op: str, body: dict, rid: int, timeout_s: float = 30.0) -> dict:
    s.send(encode_request(op, rid, body))
    while True:
        assert s.poll(int(timeout_s * 1000)), f"no reply to [{op}] within {timeout_s}s"
        msg = msgpack.unpackb(s.recv(), raw=False, strict_map_key=False)
        if msg.get("id") == rid and "status" in msg:
            return msg


def register(s: zmq.Socket, node_id: str, procs: int = 1, rid: int = 1) -> dict:
    return call(s, "register", {
        "node_id": node_id, "hostname": "h", "transport_address": "tcp://127.0.0.1:1",
        "allocated_processors": procs, "cpu": {"physical": 8, "logical": 8},
        "memory": {"total_bytes": 64 << 30, "available_bytes": 60 << 30}, "pid": 1}, rid)


def two_nodes_running_m1(run: Running) -> tuple[zmq.Socket, zmq.Socket]:
    """Agents n1 and n2 registered, each given an allocation of model m1."""
    a, b, client = run.dealer(), run.dealer(), run.dealer()
    assert register(a, "n1")["status"] == 200
    assert register(b, "n2")["status"] == 200
    r = call(client, "start_deployment", {"model_id": "m1", "number_of_allocations": 2,
                                          "wait_for": "starting", "timeout": "5s"}, 2)
    assert r["status"] == 200, r
    return a, b


@pytest.fixture
def data_dir():
    with tempfile.TemporaryDirectory(prefix="mlfleet-cf-") as d:
        yield d


# ---- 1. model chunks: bounded per node, served in turn ---------------------------------------

def test_a_node_that_never_reads_its_chunks_cannot_grow_the_coordinator(data_dir):
    """An agent asking for more chunks of 8 MiB than the per-node cap and reading none: those
    beyond the cap are refused 503 naming the limit, at most MAX_HELD_PER_NODE replies are read
    and held for it, the coordinator's memory stays within that, and another node's fetch is
    served in full meanwhile."""
    run = Running(data_dir, node_timeout_s=600.0)  # its nodes never heartbeat: not lost mid-test
    try:
        hostile, good = two_nodes_running_m1(run)
        rss0 = psutil.Process().memory_info().rss
        hostile.setsockopt(zmq.RCVHWM, 1)
        cap = getattr(server_mod, "MAX_CHUNKS_PER_NODE", 8)
        held = getattr(server_mod, "MAX_HELD_PER_NODE", 8)
        n = cap + 16
        for i in range(n):
            hostile.send(encode_request("model_chunk", 100 + i,
                                        {"sha256": SHA, "offset": 0, "length": CHUNK}))
        wait_until(lambda: getattr(run.c, "bulk_refused", 0) >= n - cap, 60,
                   what="the chunks beyond the cap refused")
        # the good node fetches the whole model meanwhile, 1 MiB at a time, 4 in flight
        got = bytearray()
        for off in range(0, CHUNK, 4 << 20):
            for k in range(4):
                good.send(encode_request("model_chunk", 1000 + off + k, {
                    "sha256": SHA, "offset": off + k * (1 << 20), "length": 1 << 20}))
            replies = {}
            while len(replies) < 4:
                assert good.poll(30_000), "the good node's chunks were not answered"
                msg = msgpack.unpackb(good.recv(), raw=False)
                if "status" in msg:
                    replies[msg["id"]] = msg
            for k in range(4):
                assert replies[1000 + off + k]["status"] == 200, replies[1000 + off + k]
                got += replies[1000 + off + k]["body"]["data"]
        assert bytes(got) == run.c.store.model_path(SHA).read_bytes()
        grew = psutil.Process().memory_info().rss - rss0
        assert grew < (held + 4) * CHUNK + (64 << 20), f"RSS grew by {grew >> 20} MiB"
        # now read what the hostile node was sent: 200s up to the cap, 503s naming the limit
        statuses = []
        while hostile.poll(5000) and len(statuses) < n:
            msg = msgpack.unpackb(hostile.recv(), raw=False)
            if "status" not in msg:
                continue  # a sync push
            statuses.append(msg["status"])
            if msg["status"] == 503:
                assert "MAX_CHUNKS_PER_NODE" in msg["body"]["error"]["reason"] or \
                    f"{cap} chunk requests" in msg["body"]["error"]["reason"], msg
        assert statuses.count(503) >= n - cap, statuses
    finally:
        run.close()


def test_chunk_replies_are_served_round_robin_across_nodes(data_dir):
    """With the bulk pump paced to a standstill after its first chunk, the next chunk is the
    other node's, not the next of the node that asked first."""
    run = Running(data_dir, bulk_max_bytes_per_sec=1,  # after one chunk, the next waits ~forever
                  node_timeout_s=600.0)
    try:
        a, b = two_nodes_running_m1(run)
        for i in range(4):
            a.send(encode_request("model_chunk", 10 + i, {"sha256": SHA, "offset": 0, "length": 16}))
        # the first is read and sent at once; the pacer holds the other three
        wait_until(lambda: run.c.bulk_queued("n1") == 3, 30, what="n1's chunks queued")
        b.send(encode_request("model_chunk", 20, {"sha256": SHA, "offset": 0, "length": 16}))
        wait_until(lambda: run.c.bulk_queued("n2") == 1, 30, what="n2's chunk queued")
        assert run.c.bulk_next_node() == "n2"
    finally:
        run.close()


# ---- 2. a failing disk: memory and the state file agree ---------------------------------------

class FullDisk:
    """The store's SQLite connection with every write failing as SQLite fails on a full disk
    (``sqlite3.OperationalError: database or disk is full``) while ``full`` is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.full = db, False

    def execute(self, q: str, *a: Any) -> Any:
        if self.full and q.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(q, *a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_failed_write_leaves_no_deployment_behind_and_a_retry_succeeds(data_dir):
    run = Running(data_dir)
    try:
        agent, client = run.dealer(), run.dealer()
        assert register(agent, "n1", procs=4)["status"] == 200
        disk = FullDisk(run.c.store.db)
        run.c.store.db = disk
        disk.full = True
        start = {"model_id": "m1", "wait_for": "starting", "timeout": "5s"}
        r = call(client, "start_deployment", start, 2)
        assert r["status"] == 500, r
        reason = r["body"]["error"]["reason"]
        assert "database or disk is full" in reason and data_dir in reason, reason
        assert call(client, "get_stats", {"deployment_id": "m1"}, 3)["status"] == 404
        disk.full = False
        r = call(client, "start_deployment", start, 4)
        assert r["status"] == 200, r
        started = {"deployment_id": "m1", "routing_state": "started", "current_allocations": 1,
                   "target_allocations": 1, "reason": "", "stats": {}}
        r = call(agent, "heartbeat", {"node_id": "n1", "deployments": [started],
                                      "memory": {"total_bytes": 64 << 30, "available_bytes": 1}}, 7)
        assert r["status"] == 200, r
        # an update and a stop that cannot be written change nothing in memory either
        disk.full = True
        r = call(client, "update_deployment", {"deployment_id": "m1", "number_of_allocations": 2}, 5)
        assert r["status"] == 500, r
        r = call(client, "stop_deployment", {"deployment_id": "m1"}, 6)
        assert r["status"] == 500, r
        dep = run.c.deployments["m1"]
        assert (dep.number_of_allocations, dep.stopping) == (1, False)
        disk.full = False
    finally:
        run.close()
    again = Running(data_dir)
    try:
        assert sorted(again.c.deployments) == ["m1"]
        assert again.c.deployments["m1"].number_of_allocations == 1
        assert not again.c.deployments["m1"].stopping
    finally:
        again.close()


# ---- 3. a damaged state file ------------------------------------------------------------------

def _state_with_two_deployments(data_dir: str) -> None:
    """A state file as a real coordinator leaves it: model m1, deployments m1 and d2 on n1."""
    run = Running(data_dir)
    try:
        agent, client = run.dealer(), run.dealer()
        assert register(agent, "n1", procs=2)["status"] == 200
        for rid, dep in ((2, "m1"), (3, "d2")):
            r = call(client, "start_deployment", {"model_id": "m1", "deployment_id": dep,
                                                  "wait_for": "starting", "timeout": "5s"}, rid)
            assert r["status"] == 200, r
    finally:
        run.close()


def _sql(data_dir: str, q: str) -> list[tuple]:
    db = sqlite3.connect(os.path.join(data_dir, "state.db"))
    try:
        rows = db.execute(q).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def _garbage(data_dir: str) -> None:
    p = Path(data_dir) / "state.db"
    for suffix in ("-wal", "-shm"):
        Path(str(p) + suffix).unlink(missing_ok=True)
    p.write_bytes(b"garbage" * 1000)


def _truncated(data_dir: str) -> None:
    p = Path(data_dir) / "state.db"
    for suffix in ("-wal", "-shm"):
        Path(str(p) + suffix).unlink(missing_ok=True)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_garbage, _truncated])
def test_a_state_file_that_cannot_be_read_is_a_clear_start_up_error(data_dir, damage):
    _state_with_two_deployments(data_dir)
    damage(data_dir)
    with pytest.raises(ValueError) as e:  # the store's StateFileError: the CLI's exit code 2
        Coordinator(CoordinatorConfig(listen="tcp://127.0.0.1:0", data_dir=data_dir))
    assert str(Path(data_dir) / "state.db") in str(e.value)


def test_the_cli_ends_with_exit_code_2_and_no_traceback_on_a_garbage_state_file(data_dir):
    _garbage(data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "mlfleet", "coordinator", "--listen",
                             "tcp://127.0.0.1:0", "--data-dir", data_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(10)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and str(Path(data_dir) / "state.db") in err, err


@pytest.mark.parametrize("damage", [
    "UPDATE deployments SET record='{\"deployment_id\": ' WHERE deployment_id='d2'",
    "UPDATE deployments SET record=json_set(record,'$.new_field',1) WHERE deployment_id='d2'",
    "UPDATE deployments SET record=json_set(record,'$.targets.n1','1') WHERE deployment_id='d2'",
    "UPDATE deployments SET record=json_set(record,'$.number_of_allocations','x') WHERE deployment_id='d2'",
    "UPDATE deployments SET model_id='gone', record=json_set(record,'$.model_id','gone') "
    "WHERE deployment_id='d2'",
])
def test_a_damaged_deployment_row_is_set_aside_and_the_rest_serve(data_dir, damage):
    _state_with_two_deployments(data_dir)
    _sql(data_dir, damage)
    before = _sql(data_dir, "SELECT record FROM deployments WHERE deployment_id='d2'")
    run = Running(data_dir)
    try:
        assert sorted(run.c.deployments) == ["m1"]
        agent, client = run.dealer(), run.dealer()
        r = register(agent, "n2")
        assert r["status"] == 200, r
        r = call(client, "get_stats", {"deployment_id": "m1"}, 2)
        assert r["status"] == 200, r
        r = call(client, "start_deployment", {"model_id": "m1", "deployment_id": "d2",
                                              "wait_for": "starting", "timeout": "5s"}, 3)
        assert r["status"] == 409 and "[deployment_id] [d2]" in r["body"]["error"]["reason"], r
    finally:
        run.close()
    # the row is still there, as it was, for an operator
    assert _sql(data_dir, "SELECT record FROM deployments WHERE deployment_id='d2'") == before


def test_a_bad_stored_node_capacity_does_not_stop_the_start(data_dir):
    _state_with_two_deployments(data_dir)
    _sql(data_dir, "UPDATE meta SET value='x' WHERE key='node_capacity/n1'")
    run = Running(data_dir)
    try:
        assert sorted(run.c.deployments) == ["d2", "m1"]
    finally:
        run.close()


# ---- 4. what agents report and register stays bounded -----------------------------------------

def test_unassigned_reports_are_remembered_from_the_last_heartbeat_only(data_dir, caplog):
    run = Running(data_dir)
    try:
        agent = run.dealer()
        assert register(agent, "n1")["status"] == 200
        with caplog.at_level("WARNING", logger="mlfleet.coordinator.server"):
            for i in range(20):
                deps = [{"deployment_id": f"x{i}-{j}", "routing_state": "started", "reason": "",
                         "current_allocations": 1, "target_allocations": 1, "stats": {}} for j in range(256)]
                memory = {"total_bytes": 64 << 30, "available_bytes": 1}
                r = call(agent, "heartbeat", {"node_id": "n1", "deployments": deps, "memory": memory}, 10 + i)
                assert r["status"] == 200, r
        assert len(run.c.nodes["n1"].ignored) == 256  # the last report's, not every one ever sent
        lines = [r for r in caplog.records if "not assigned to it" in r.getMessage()]
        assert len(lines) <= 20 * (server_mod.MAX_IGNORED_LOGGED + 1), len(lines)
    finally:
        run.close()


def test_one_connection_registers_one_node(data_dir):
    run = Running(data_dir)
    try:
        agent = run.dealer()
        assert register(agent, "n1")["status"] == 200
        r = register(agent, "fake-1", rid=2)
        assert r["status"] == 409, r
        reason = r["body"]["error"]["reason"]
        assert "[node_id] [fake-1]" in reason and "[n1]" in reason, reason
        assert register(agent, "n1", rid=3)["status"] == 200  # registering again as itself is fine
        assert sorted(run.c.nodes) == ["n1"]
    finally:
        run.close()


class JumpClock:
    """The real monotonic clock, plus a jump the test sets (a coordinator that ran for long)."""

    def __init__(self) -> None:
        self.jump = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.jump

    def wall_ms(self) -> int:
        return int(time.time() * 1000)


def test_nodes_lost_for_long_are_forgotten_with_their_meta_rows(data_dir):
    clock = JumpClock()
    run = Running(data_dir, clock=clock)
    try:
        agent = run.dealer()
        assert register(agent, "n1")["status"] == 200
        meta = "SELECT key FROM meta WHERE key LIKE 'node_%/n1'"
        assert _sql(data_dir, meta)
        clock.jump = run.c.cfg.node_timeout_s + 1
        wait_until(lambda: not run.c.nodes["n1"].alive, 30, what="n1 lost")
        assert "n1" in run.c.nodes  # a node lost a short while is still known
        clock.jump += server_mod.NODE_FORGET_AFTER_S
        wait_until(lambda: "n1" not in run.c.nodes, 30, what="n1 forgotten")
        assert _sql(data_dir, meta) == []
    finally:
        run.close()

"""Nothing takes a daemon down: every op of every socket, driven with generated values against live
daemons. Each example must be answered within a deadline with a status a client can act on
(never a 500, never silence), and the daemon must still answer ``ping`` afterwards.

The cluster is shared by the module: one agent (``node-a``), one model (``fz-model``), one
started deployment of it (``fz-dep``) and a fake agent (``FakeAgent``, a thread speaking the agent
protocol with no processes behind it), so that ops reach real objects. State is kept bounded:

* ``fz-dep`` holds (in the planner's eyes) every processor and all memory of ``node-a``, so no
  generated start is ever placed there (no model host is spawned by the fuzz); valid starts land
  on the fake agent, which reports them started: they start, update, route and stop for real.
  A generated start that creates a deployment (``fz-new-1``, ``fz-new-2`` or ``fz-model``) is
  stopped again at once, and waits at most about a second (short ``timeout`` values); generated
  updates change ``fz-upd``, a deployment the fixture started on the fake agent;
* a valid ``stop_deployment`` or ``update_deployment`` of ``fz-dep`` is not sent (it is sent with
  invalid values only); ``delete_model`` of ``fz-model`` is a 409 while it is deployed;
* generated agent bodies register fake nodes from a fixed pool of connections (long-lived
  DEALERs, with routing ids ``agent/<node id>`` where the coordinator knows agents by their own
  routing id), never as ``node-a`` or the fake agent; they are lost after the node timeout (3 s);
  the deployments their reports name and the ones stops target are disjoint, so a stop never
  waits for a node that will not confirm.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlfleet.common import PROTOCOL_VERSION
from mlfleet.common import messages as M
from mlfleet.common.errors import ApiError
from mlfleet.common.params import validate_update
from mlfleet.common.protocol import decode_reply, encode_array, encode_request, pack
from tests.helpers import Cluster, Mlp, running_cluster, save_model, wait_until

pytestmark = [pytest.mark.timeout(240),
              # the junk includes large values; hypothesis warns when it would print them
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]

ALLOWED = {200, 400, 401, 403, 404, 408, 409, 429, 503}
MODEL, DEP = "fz-model", "fz-dep"
FAKE_NODES = ("fz-node-1", "fz-node-2", "FZ.Node:3")  # fake nodes registered by generated bodies
FAKE_AGENT = "fz-fake"                                  # the well-behaved fake agent (FakeAgent)
UPLOADS = ("00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100")
START_IDS = ("fz-new-1", "fz-new-2")          # what generated starts may create
ON_FAKE = "fz-upd"                             # started on the fake agent; generated updates change it
REPORT_IDS = (DEP, "fz-rep", "fz-ghost")       # what fake route reports may mention
# examples per op; a longer, random hunt: FUZZ_EXAMPLES=1000 FUZZ_RANDOM=1
PER_OP = int(os.environ.get("FUZZ_EXAMPLES", "60"))


def fuzz_settings(n: int = PER_OP):
    return settings(max_examples=n, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ---- live cluster and raw sockets ------------------------------------------------------------

@dataclass
class Live:
    cluster: Cluster
    coordinator: str
    agent: str
    model_sha: str
    fake: FakeAgent
    model_bytes: bytes
    chosen_ids: bool  # agents connect with routing id "agent/<node id>" (else the ROUTER assigns one)
    ctx: zmq.Context = field(default_factory=zmq.Context.instance)
    rids: Any = field(default_factory=lambda: itertools.count(1))
    socks: dict = field(default_factory=dict)

    def sock(self, endpoint: str, name: Any = None, identity: bytes | None = None) -> zmq.Socket:
        """Long-lived DEALERs, one per endpoint and name: a fake node keeps its connection from
        register to heartbeat, and a routing id reconnecting while its old pipe is still known to
        the ROUTER would be refused."""
        key = (endpoint, name, identity)
        if key not in self.socks:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if identity is not None:
                s.setsockopt(zmq.ROUTING_ID, identity)
            s.connect(endpoint)
            self.socks[key] = s
        return self.socks[key]

    def agent_identity(self, node_id: str) -> bytes | None:
        return b"agent/" + node_id.encode() if self.chosen_ids else None

    def __repr__(self) -> str:
        return f"Live(coordinator={self.coordinator}, agent={self.agent})"

    def close(self) -> None:
        for s in self.socks.values():
            s.close(0)


def recv_reply(s: zmq.Socket, rid: Optional[int], deadline_s: float):
    """The reply to ``rid`` (any reply if None), skipping pushes and stale replies; None at the
    deadline."""
    end = time.monotonic() + deadline_s
    while (left := end - time.monotonic()) > 0:
        if not s.poll(max(1, int(left * 1000))):
            break
        frames = s.recv_multipart()  # a header, and for an inference answer its results' frames
        try:
            raw = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            continue
        if isinstance(raw, dict) and "op" in raw:  # a push to a fake agent (sync, clear_cache)
            continue
        rep = decode_reply(frames[0])
        if rid is None or rep.id == rid:
            return rep
    return None


def call(live: Live, endpoint: str, op: str, body: Any, deadline_s: float = 10.0,
         name: Any = None, identity: bytes | None = None):
    rid = next(live.rids)
    s = live.sock(endpoint, name, identity)
    payload = []
    if op == "infer" and isinstance(body, dict) and "docs" in body:  # the documents travel after the header
        body = dict(body)
        payload = [pack(body.pop("docs"))]
    s.send_multipart([pack({"v": PROTOCOL_VERSION, "op": op, "id": rid, "body": body}), *payload])
    return recv_reply(s, rid, deadline_s)


def raw_call(live: Live, endpoint: str, frames: list[bytes], deadline_s: float = 5.0):
    """Frames on a fresh DEALER (their reply may carry any id)."""
    s = live.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(frames)
        return recv_reply(s, None, deadline_s)
    finally:
        s.close(0)


def check_reply(rep, what: Any) -> None:
    assert rep is not None, f"no reply to {what!r:.2000}"
    # --hypothesis-show-statistics shows how deep the examples go (FUZZ_REASONS=1: by reason)
    reason = rep.body.get("error", {}).get("reason", "") if isinstance(rep.body.get("error"), dict) else ""
    event(f"status {rep.status}" + (f": {reason[:70]}" if os.environ.get("FUZZ_REASONS") else ""))
    assert rep.status in ALLOWED, f"status {rep.status} for {what!r:.2000}: {rep.body!r:.2000}"
    if rep.status != 200:
        err = rep.body.get("error")
        assert rep.body.get("status") == rep.status and isinstance(err, dict), rep.body
        assert isinstance(err.get("type"), str) and isinstance(err.get("reason"), str), rep.body


def check_alive(live: Live, endpoint: str) -> None:
    for d in (live.cluster.coordinator, *live.cluster.agents.values()):
        assert d.proc.poll() is None, f"{d.name} exited with {d.proc.returncode}"
    rep = call(live, endpoint, "ping", {}, 10.0)
    assert rep is not None and rep.status == 200, f"{endpoint} does not answer ping: {rep}"


class FakeAgent(threading.Thread):
    """A well-behaved agent without processes: it registers with a lot of room, heartbeats every
    100 ms and reports each assignment it is given as started at its target (and as gone once it
    is stopping). Generated starts land here, so they start, update, route and stop for real
    without a model host. Everything it is told must be accepted: ``errors`` stays empty."""

    def __init__(self, endpoint: str, identity: bytes | None, node_id: str = FAKE_AGENT) -> None:
        super().__init__(name="fake-agent", daemon=True)
        self.endpoint, self.node_id, self.identity = endpoint, node_id, identity
        self.halt = threading.Event()
        self.assignments: dict[str, dict] = {}
        self.errors: list[str] = []
        self.beats = 0

    def _reports(self) -> list[dict]:
        return [{"deployment_id": a["deployment_id"], "routing_state": "started",
                 "current_allocations": a["target_allocations"],
                 "target_allocations": a["target_allocations"], "reason": "",
                 "stats": {"inference_count": 0, "start_time": 1_700_000_000_000, "last_access": None}}
                for a in self.assignments.values() if not a["stopping"] and a["target_allocations"] > 0]

    def run(self) -> None:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.identity is not None:
            s.setsockopt(zmq.ROUTING_ID, self.identity)
        s.connect(self.endpoint)
        rids = itertools.count(1)
        registered = False
        try:
            while not self.halt.is_set():
                if registered:
                    op, b = "heartbeat", {"node_id": self.node_id, "deployments": self._reports(),
                                          "memory": {"total_bytes": 1 << 45, "available_bytes": 1 << 44}}
                else:
                    op, b = "register", {"node_id": self.node_id, "hostname": "fake-host",
                                         "transport_address": "tcp://127.0.0.1:9", "allocated_processors": 64,
                                         "cpu": {"physical": 32, "logical": 64}, "pid": 4242,
                                         "memory": {"total_bytes": 1 << 45, "available_bytes": 1 << 44},
                                         "deployments": self._reports()}
                rid = next(rids)
                s.send(pack({"v": PROTOCOL_VERSION, "op": op, "id": rid, "body": b}))
                rep = recv_reply(s, rid, 10.0)
                if rep is None or rep.status != 200:
                    self.errors.append(f"{op}: {rep and (rep.status, rep.body)}")
                    registered = False
                elif rep.body.get("reregister"):
                    registered = False
                else:
                    registered = True
                    self.assignments = {a["deployment_id"]: a for a in rep.body.get("assignments", [])}
                    self.beats += 1
                self.halt.wait(0.1)
        finally:
            s.close(0)


def routing_ids_chosen_by_agents(endpoint: str) -> bool:
    """Agents are known by a routing id of their own ("agent/<node id>"), or the coordinator
    refuses chosen routing ids (it assigns them and knows agents by their registration)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, b"agent/fz-probe")
    s.connect(endpoint)
    try:
        s.send(encode_request("ping", 1, {}))
        rep = recv_reply(s, 1, 10.0)
    finally:
        s.close(0)
    assert rep is not None, "no answer to a ping from a chosen routing id"
    return rep.status == 200


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-ops")
    with running_cluster(work, {"node-a": 2}) as c:
        with c.client() as client:
            put = client.put_model(MODEL, save_model(Mlp(), work / "mlp.pt"))
            node = client.get_nodes()["nodes"]["node-a"]
            total = int(node["memory"]["total_bytes"])
            size = int(put["model_size_bytes"])
            # planner memory estimate = 240mb + 2 x size + (cache - size): leave 16mb of node-a
            cache = total - (240 << 20) - size - (16 << 20)
            client.start_deployment(MODEL, deployment_id=DEP, threads_per_allocation=2,
                                    cache_size=f"{cache}b", wait_for="started", timeout="90s")
            chosen = routing_ids_chosen_by_agents(c.coordinator.endpoint)
            fake = FakeAgent(c.coordinator.endpoint, b"agent/" + FAKE_AGENT.encode() if chosen else None)
            fake.start()
            wait_until(lambda: FAKE_AGENT in client.get_nodes()["nodes"], 20, what="the fake agent")
            # a deployment on the fake agent that generated updates may change for real
            client.start_deployment(MODEL, deployment_id=ON_FAKE, wait_for="started", timeout="20s")
        lv = Live(c, c.coordinator.endpoint, c.agents["node-a"].endpoint, put["sha256"], fake,
                  (work / "mlp.pt").read_bytes(), chosen)
        try:
            yield lv
        finally:
            fake.halt.set()
            fake.join(15)
            lv.close()
        assert not fake.errors, fake.errors[:5]


# ---- values -------------------------------------------------------------------------------------

def _nested(depth: int) -> Any:
    return functools.reduce(lambda acc, _: [acc], range(depth), 1)


EXTREME_INTS = st.sampled_from([
    0, -1, 1, 2, 3, 31, 32, 33, 64, 1023, 1024, 1025, 4096, 4097, 100_000, 100_001, 1_000_000,
    1_000_001, 1 << 22, (1 << 22) + 1, 2**31 - 1, 2**31, 2**32, 1 << 50, (1 << 50) + 1, 2**53 + 1,
    2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63, 3_600_000, 3_600_001, 8 << 20, (8 << 20) + 1])
INTS = st.one_of(EXTREME_INTS, st.integers(-2**63, 2**64 - 1))
EXTREME_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, -1.5, 1.0, 2.0,
                                  1e308, -1e308, 5e-324, 2.0**63, 2.0**64, 1e15, 1e16])
FLOATS = st.one_of(EXTREME_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
ODD_STRINGS = st.sampled_from([
    "", " ", "x" * 10_000, "é", "\x00", "\n\t", "../../etc/passwd", "UPPER", "-x-", "a" * 65,
    "a" * 64, "nan", "NaN", "inf", "-inf", "Infinity", "1e400s", "9" * 400 + "s", "9" * 60 + "d",
    "9" * 400 + "pb", "1" * 64, "-1s", "0s", "0ms", "8d", "7d", "1000000d", "1.5pb", "2pb", "-1kb",
    "💥" * 10, "\u202e\u0000x", "a/b", "%s%n{0}", "{name}", "_all", "*", "starting", "started",
    "stopped", "failed", "low", "normal", "pass_through", "text_embedding", "tcp://", "agent/x",
    DEP, MODEL, "node-b", "0" * 64, "F" * 64, UPLOADS[0]])
STRINGS = st.one_of(ODD_STRINGS, st.text(max_size=24))
SCALAR_JUNK = st.one_of(st.none(), st.booleans(), INTS, FLOATS, STRINGS, st.binary(max_size=24))
JUNK = st.one_of(
    SCALAR_JUNK,
    st.recursive(SCALAR_JUNK, lambda ch: st.lists(ch, max_size=4)
                 | st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), ch, max_size=4),
                 max_leaves=10),
    st.sampled_from([_nested(100), _nested(400), [0] * 20_000, {"k" * 5000: 1},
                     {str(i): i for i in range(2000)}]),
)
UNKNOWN_KEYS = st.dictionaries(st.sampled_from(["bogus", "", "x" * 300, "v", "id", "op", "body"]),
                               JUNK, max_size=2)
NON_MAP_BODIES = st.one_of(st.lists(SCALAR_JUNK, max_size=3), st.text(max_size=8), INTS,
                           st.binary(max_size=8), st.booleans(), st.floats(allow_nan=True))


BAD = st.one_of(INTS, FLOATS, STRINGS, SCALAR_JUNK, JUNK)  # extreme numbers and strings, any type


@st.composite
def shaped(draw, required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy],
           damage: int = 2):
    """A map with its right keys and plausible values, then damaged a little: up to ``damage``
    values replaced by extreme or wrong ones, now and then a required key left out or unknown keys
    added. Mostly-valid maps reach the handlers (and the checks nested deep inside them)."""
    out = {k: draw(v) for k, v in required.items()}
    for k in sorted(optional):
        if draw(st.booleans()):
            out[k] = draw(optional[k])
    keys = sorted({*required, *optional})
    if keys:
        n = min(len(keys), draw(st.sampled_from([0, 1, 1, 2, 2][:damage * 2 + 1])))
        for k in draw(st.lists(st.sampled_from(keys), min_size=n, max_size=n, unique=True)):
            out[k] = draw(BAD)
        if required and draw(st.integers(0, 9)) == 9:
            out.pop(draw(st.sampled_from(sorted(required))), None)
    if draw(st.integers(0, 9)) == 9:
        out.update(draw(UNKNOWN_KEYS))
    return out


@st.composite
def _mostly(draw, usual: st.SearchStrategy, rare: st.SearchStrategy):
    """``usual`` nine times in ten (``st.one_of`` would pick each branch about as often)."""
    return draw(rare if draw(st.integers(0, 9)) == 9 else usual)


def body(required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy] | None = None):
    """An op's body: a damaged map (see ``shaped``) or, now and then, not a map at all."""
    return _mostly(shaped(required, optional or {}), NON_MAP_BODIES)


def nested(required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy] | None = None):
    return _mostly(shaped(required, optional or {}, damage=1), BAD)


def hexes(n: int) -> st.SearchStrategy:
    return st.text("0123456789abcdef", min_size=n, max_size=n)


ADAPTIVE = nested({}, {"enabled": st.booleans(),
                       "min_number_of_allocations": st.one_of(st.none(), st.integers(0, 3)),
                       "max_number_of_allocations": st.one_of(st.none(), st.integers(1, 4))})
MEMORY = nested({"total_bytes": st.integers(0, 1 << 50), "available_bytes": st.integers(0, 1 << 50)})
CPU = nested({"physical": st.integers(1, 4096), "logical": st.integers(1, 4096)})
STATS = nested({}, {
    "inference_count": st.integers(0, 2**63 - 1), "error_count": st.integers(0, 10),
    "average_inference_time_ms": st.floats(0, 1e6), "average_batch_size": st.floats(0, 10),
    "start_time": st.one_of(st.none(), st.integers(0, M.MAX_EPOCH_MS)),
    "last_access": st.one_of(st.none(), st.integers(0, M.MAX_EPOCH_MS)),
    "number_of_pending_requests": st.integers(0, 10), "peak_throughput_per_minute": st.integers(0, 10)})
REPORT = nested({"deployment_id": st.sampled_from(REPORT_IDS),
                 "routing_state": st.sampled_from(M.ROUTING_STATES),
                 "current_allocations": st.integers(0, 8),
                 "target_allocations": st.integers(0, 8)},
                {"reason": st.text(max_size=20), "stats": STATS})
REPORTS = st.lists(REPORT, max_size=3)
GOOD_ARRAY = encode_array(np.ones((1, 8), np.float32))
# arrays that decode (data matches the shape) in every dtype numpy reads: what reaches torch and the model
DECODABLE = [{"dtype": dt, "shape": shape, "data": bytes(np.dtype(dt).itemsize * int(np.prod(shape)))}
             for dt in ("float32", "float64", "float16", ">f4", "int8", "int64", "uint8", "uint16", "uint64",
                        "bool", "complex64", "complex128", "V8", "M8[s]", "m8[s]", "U2", "S3", "float128",
                        "<i2")
             for shape in ([1, 8], [8], [], [0, 8], [2, 4])]
ARRAY = _mostly(
    st.one_of(st.just(GOOD_ARRAY), st.sampled_from(DECODABLE)),
    nested({"dtype": st.sampled_from(["float32", "float64", "<f4", ">f4", "int64", "bool", "V8", "M8", "U4",
                                      "S0", "O", "float128", "complex64", "bfloat16", "f2", "uint64", "i0",
                                      "<U2"]),
            "shape": st.lists(INTS, max_size=3),
            "data": st.binary(max_size=64)}))
DOC = _mostly(st.one_of(st.fixed_dictionaries({"input": ARRAY}),
                        st.fixed_dictionaries({"inputs": st.lists(ARRAY, max_size=2)}),
                        st.fixed_dictionaries({"text_field": STRINGS})),
              JUNK)
MODEL_CONFIG = nested({}, {"pooling": st.sampled_from(["mean", "cls", "max"]), "normalize": st.booleans(),
                           "max_sequence_length": st.integers(1, 512), "source": st.text(max_size=8),
                           "other": JUNK})

COORDINATOR_OPS: dict[str, st.SearchStrategy] = {
    "put_model_chunk": body({"upload_id": st.sampled_from(UPLOADS), "offset": st.integers(0, 128),
                             "data": st.binary(max_size=64)}),
    "put_model": body({"model_id": st.sampled_from(["fz-put", MODEL, DEP]),
                       "upload_id": st.sampled_from(UPLOADS),
                       "sha256": st.one_of(hexes(64), st.just("0" * 64))},
                      {"task": st.sampled_from(M.TASKS), "tokenizer": st.binary(max_size=32),
                       "model_config": MODEL_CONFIG}),
    "get_models": body({}, {"model_id": st.sampled_from([MODEL, "_all", "*", "fz-none"])}),
    "delete_model": body({"model_id": st.sampled_from([MODEL, "fz-none", "fz-put"])}),
    "start_deployment": body(
        {"model_id": st.sampled_from([MODEL, "fz-none"])},
        {"deployment_id": st.sampled_from([*START_IDS, DEP, None]),
         "number_of_allocations": st.one_of(st.none(), st.integers(1, 3)),
         "threads_per_allocation": st.sampled_from([1, 2, 4, 32]),
         "queue_capacity": st.sampled_from([1, 1024, 1_000_000]),
         "priority": st.sampled_from(["normal", "low"]),
         "cache_size": st.sampled_from(["0b", "1kb", "100mb", "1pb", 0, 1024]),
         "timeout": st.sampled_from(["1ms", "200ms", "0.3s", 0.2, 1]),
         "wait_for": st.sampled_from(["starting", "starting", "started", "fully_allocated"]),
         "adaptive_allocations": ADAPTIVE,
         "max_batch_size": st.sampled_from([1, 8, 1024]),
         "max_batch_delay": st.sampled_from(["0ms", "5ms", "1s", 0, 1.0, 0.5])}),
    "update_deployment": body({"deployment_id": st.sampled_from([ON_FAKE, DEP, ON_FAKE, START_IDS[0],
                                                                 "fz-none"])},
                              {"number_of_allocations": st.one_of(st.none(), st.integers(1, 3)),
                               "adaptive_allocations": ADAPTIVE}),
    "stop_deployment": body({"deployment_id": st.sampled_from([*START_IDS, MODEL, "fz-none", DEP])},
                            {"force": st.booleans(), "allow_no_match": st.booleans(),
                             "finish_pending_work": st.booleans()}),
    "clear_cache": body({"deployment_id": st.sampled_from([DEP, ON_FAKE, "fz-none"])}),
    "get_stats": body({}, {"deployment_id": st.sampled_from([DEP, ON_FAKE, MODEL, "_all", "*", "fz-none"])}),
    "get_nodes": body({}),
    "get_routing": body({"deployment_id": st.sampled_from([DEP, ON_FAKE, START_IDS[0], "fz-none"])}),
    "await_routes": body({"deployment_id": st.sampled_from([DEP, ON_FAKE, START_IDS[0], "fz-none"])},
                         {"timeout_ms": st.integers(1, 300)}),
    "ping": body({}),
    "rotate_node_key": body({"node_id": st.sampled_from([*FAKE_NODES, "fz-none"]),
                             "public_key": st.text("0123456789abcdefABCDEF.-:+=^!/*?&<>()[]{}@%$#",
                                                   min_size=40, max_size=40)}),
}
AGENT_PROTOCOL_OPS: dict[str, st.SearchStrategy] = {
    "register": body({"node_id": st.sampled_from(FAKE_NODES), "hostname": st.just("fz-host"),
                      "transport_address": st.just("tcp://127.0.0.1:9"),
                      "allocated_processors": st.integers(1, 4096), "cpu": CPU, "memory": MEMORY,
                      "pid": st.integers(1, 1 << 22)},
                     {"deployments": REPORTS}),
    "heartbeat": body({"node_id": st.sampled_from([*FAKE_NODES, "node-a"]), "memory": MEMORY},
                      {"deployments": REPORTS}),
    "model_chunk": body({"sha256": st.sampled_from(["model", "0" * 64]), "offset": st.integers(0, 1 << 20),
                         "length": st.integers(1, 8 << 20)}),
    "leave": body({"node_id": st.sampled_from([*FAKE_NODES, "node-a", FAKE_AGENT])}),
}
INFERENCE_OPS: dict[str, st.SearchStrategy] = {
    "infer": body({"deployment_id": st.sampled_from([DEP, "fz-none"]),
                   "docs": st.lists(DOC, max_size=3)},
                  {"timeout_ms": st.integers(1, 300)}),
    "ping": body({}),
}


def _decodes(cls: type, b: Any) -> Optional[Any]:
    if not isinstance(b, dict):
        return None
    try:
        return M.decode(cls, b)
    except ApiError:
        return None


def destroys_shared(op: str, b: Any) -> bool:
    """A valid stop or update of fz-dep would change the shared deployment: not sent."""
    if op == "stop_deployment":
        msg = _decodes(M.StopDeployment, b)
        return msg is not None and msg.deployment_id == DEP
    if op == "update_deployment":
        msg = _decodes(M.UpdateDeployment, b)
        if msg is None or msg.deployment_id != DEP:
            return False
        try:
            validate_update(msg.number_of_allocations, msg.adaptive_allocations, None)
        except ApiError:
            return False
        return True
    return False


def deadline_for(op: str) -> float:
    # stop waits for agents up to the coordinator's stop timeout (30 s); nothing here should
    return 35.0 if op == "stop_deployment" else 10.0


# ---- the properties ---------------------------------------------------------------------------

def each_op(table: dict[str, st.SearchStrategy]):
    """One property per op of ``table``, its body drawn from the op's strategy (``data``)."""
    def wrap(fn):
        return pytest.mark.parametrize("op", sorted(table))(fuzz_settings()(given(data=st.data())(fn)))
    return wrap


def test_every_op_is_fuzzed(tmp_path):
    """The op table and the strategies here name the same ops (a new op needs a strategy)."""
    from mlfleet.coordinator.config import CoordinatorConfig
    from mlfleet.coordinator.server import Coordinator
    coord = Coordinator(CoordinatorConfig(listen="tcp://127.0.0.1:0", data_dir=str(tmp_path / "c")))
    try:
        assert set(coord.handlers) <= set(COORDINATOR_OPS) | set(AGENT_PROTOCOL_OPS)
        assert coord.agent_ops <= set(AGENT_PROTOCOL_OPS)
    finally:
        coord.close()


@each_op(COORDINATOR_OPS)
def test_coordinator_client_ops(live, op, data):
    b = data.draw(COORDINATOR_OPS[op], label="body")
    if destroys_shared(op, b):
        return
    rep = call(live, live.coordinator, op, b, deadline_for(op))
    check_reply(rep, (op, b))
    if op == "start_deployment" and rep.status in (200, 408):  # it was created: stop it again
        msg = M.decode(M.StartDeployment, b)
        stop = call(live, live.coordinator, "stop_deployment",
                    {"deployment_id": msg.deployment_id or msg.model_id, "force": True}, 35.0)
        assert stop is not None and stop.status == 200, stop
    check_alive(live, live.coordinator)


@each_op(AGENT_PROTOCOL_OPS)
def test_coordinator_agent_ops(live, op, data):
    b = data.draw(AGENT_PROTOCOL_OPS[op], label="body")
    if isinstance(b, dict) and b.get("sha256") == "model":
        b["sha256"] = live.model_sha
    node = b.get("node_id") if isinstance(b, dict) else None
    if op == "register" and node in ("node-a", FAKE_AGENT):
        return  # registering as a real node from another connection would take its name
    if node in FAKE_NODES:  # the connection (and routing id) of that fake node: register goes all the way
        name = node
    else:
        name = data.draw(st.sampled_from([*FAKE_NODES, "junk-id", "not-an-agent"]), label="connection")
    identity = {"junk-id": b"agent/\xff\x00junk", "not-an-agent": b"not-an-agent"}.get(
        name, live.agent_identity(name))
    rep = call(live, live.coordinator, op, b, 10.0, name=("agent", name), identity=identity)
    check_reply(rep, (op, identity, b))
    if identity is not None and not identity.startswith(b"agent/"):
        assert rep.status == 400, rep.body  # for agents only (or malformed)
    check_alive(live, live.coordinator)


@each_op(INFERENCE_OPS)
def test_agent_inference_ops(live, op, data):
    b = data.draw(INFERENCE_OPS[op], label="body")
    rep = call(live, live.agent, op, b, 10.0)
    check_reply(rep, (op, b))
    check_alive(live, live.agent)


@fuzz_settings()
@given(docs=st.lists(DOC, min_size=1, max_size=3), timeout_ms=st.sampled_from([1, 50, 2000]))
def test_agent_infer_documents(live, docs, timeout_ms):
    """Documents (arrays of every dtype numpy reads, bad shapes, junk) that reach the worker and
    the model of the live deployment."""
    rep = call(live, live.agent, "infer", {"deployment_id": DEP, "docs": docs, "timeout_ms": timeout_ms},
               10.0)
    check_reply(rep, docs)
    check_alive(live, live.agent)


PUT_MODEL = shaped({"model_id": st.sampled_from(["fz-put-1", "fz-put-2", MODEL])},
                   {"task": st.sampled_from(M.TASKS), "tokenizer": st.binary(max_size=64),
                    "model_config": MODEL_CONFIG}, damage=1)
_uploads = itertools.count(1)


@fuzz_settings()
@given(b=PUT_MODEL)
def test_put_model_of_a_real_upload(live, b):
    """put_model all the way (a real TorchScript upload) with generated task, tokenizer and
    model_config; a model that is stored is read back, deployed on the fake agent and deleted."""
    upload = f"{next(_uploads):032x}"
    rep = call(live, live.coordinator, "put_model_chunk",
               {"upload_id": upload, "offset": 0, "data": live.model_bytes})
    assert rep is not None and rep.status == 200, rep
    b = {**b, "upload_id": upload, "sha256": live.model_sha}
    rep = call(live, live.coordinator, "put_model", b)
    check_reply(rep, b)
    if rep.status == 200:
        model_id = b["model_id"]
        for op, body in (("get_models", {"model_id": model_id}),
                         ("start_deployment", {"model_id": model_id, "wait_for": "started",
                                               "timeout": "20s"}),
                         ("get_stats", {"deployment_id": model_id}),
                         ("stop_deployment", {"deployment_id": model_id, "force": True}),
                         ("delete_model", {"model_id": model_id})):
            r = call(live, live.coordinator, op, body, 35.0)
            check_reply(r, (op, body, b))
            assert r.status == 200, (op, r.body, b)
    check_alive(live, live.coordinator)


ENVELOPE = st.dictionaries(
    st.sampled_from(["v", "op", "id", "body", "x"]),
    st.one_of(st.sampled_from([1, 1.0, True, "ping", "get_nodes", "infer", "register"]), SCALAR_JUNK,
              st.dictionaries(st.text(max_size=6), SCALAR_JUNK, max_size=3)),
    max_size=5)
FRAMES = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    ENVELOPE.map(lambda d: [msgpack.packb(d, use_bin_type=True)]),
    st.tuples(st.sampled_from(["ping", "get_stats", "infer", "register", "nope", "x" * 1000]), INTS, JUNK)
      .map(lambda t: [msgpack.packb({"v": PROTOCOL_VERSION, "op": t[0], "id": t[1], "body": t[2]},
                                    use_bin_type=True)]),
    st.sampled_from([[b""], [b"\xc1"], [pack({"v": PROTOCOL_VERSION, "op": "ping", "id": 1})[:-2]],
                     [encode_request("ping", 1, {}), encode_request("ping", 2, {})],
                     [msgpack.packb([[[[]]]])], [b"\x91" * 5000 + b"\xc0"],
                     [pack({"v": PROTOCOL_VERSION, "op": "ping", "id": 2**64 - 1, "body": None})]]),
)


@pytest.mark.parametrize("which", ["coordinator", "agent"])
@fuzz_settings()
@given(frames=FRAMES)
def test_raw_frames(live, which, frames):
    endpoint = live.coordinator if which == "coordinator" else live.agent
    rep = raw_call(live, endpoint, frames, 10.0)
    check_reply(rep, frames)
    check_alive(live, endpoint)


def test_no_fault_was_caught_in_the_daemons(live):
    """Faults the daemons catch (and so survive) are bugs too: their logs name none."""
    markers = ("handler failed", "carrying on", "failed to handle", "waiter for request")
    for d in (live.cluster.coordinator, *live.cluster.agents.values()):
        text = Path(d.log).read_text(errors="replace")
        hits = [ln for ln in text.splitlines() if any(m in ln for m in markers)]
        assert not hits, f"{d.name}: {hits[:5]}"

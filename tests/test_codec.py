"""Pure unit tests of the wire codec (common.protocol), typed messages (common.messages), units
(common.units) and the error tree (common.errors)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlfleet.common import PROTOCOL_VERSION
from mlfleet.common import errors as E
from mlfleet.common import messages as M
from mlfleet.common import protocol as P
from mlfleet.common.units import format_time, normalize_bytes, parse_bytes, parse_time

pytestmark = pytest.mark.timeout(60)


# ---- request / reply envelopes ----------------------------------------------------------------

def test_request_round_trip():
    body = {"model_id": "m", "number_of_allocations": 2, "nested": {"a": [1, 2.5, None, True]},
            "blob": b"\x00\x01\xff"}
    frame = P.encode_request("start_deployment", 42, body)
    assert isinstance(frame, bytes)
    req = P.decode_request(frame)
    assert req == P.Request(op="start_deployment", id=42, body=body)


def test_request_envelope_shape():
    frame = P.encode_request("ping", 7, {})
    assert msgpack.unpackb(frame, raw=False) == {"v": PROTOCOL_VERSION, "op": "ping", "id": 7,
                                                 "body": {}}


def test_request_missing_or_null_body_is_empty():
    frame = P.pack({"v": PROTOCOL_VERSION, "op": "x", "id": 1})
    assert P.decode_request(frame).body == {}
    frame = P.pack({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "body": None})
    assert P.decode_request(frame).body == {}


@pytest.mark.parametrize("rid", [0, 1, 2**31, 2**63 - 1, -5])
def test_request_ids(rid):
    assert P.decode_request(P.encode_request("x", rid, {})).id == rid


def test_reply_round_trip():
    frame = P.encode_reply(9, 200, {"acknowledged": True})
    rep = P.decode_reply(frame)
    assert rep == P.Reply(id=9, status=200, body={"acknowledged": True}, rv=0)


def test_reply_with_routing_version():
    rep = P.decode_reply(P.encode_reply(3, 200, {"x": 1}, rv=17))
    assert rep.rv == 17 and rep.body == {"x": 1}


def test_reply_error_body_round_trip():
    err = E.NotFound("No known model deployment with id [d]")
    rep = P.decode_reply(P.encode_reply(5, err.status, err.to_body()))
    assert rep.status == 404
    back = E.from_body(rep.body)
    assert isinstance(back, E.NotFound) and back.reason == err.reason


def test_reply_non_int_rv_ignored():
    frame = P.pack({"v": PROTOCOL_VERSION, "id": 1, "status": 200, "body": {}, "rv": "x"})
    assert P.decode_reply(frame).rv == 0


@pytest.mark.parametrize("msg", [
    {"v": PROTOCOL_VERSION, "id": 1, "status": "200", "body": {}},
    {"v": PROTOCOL_VERSION, "id": 1, "status": 200, "body": []},
    {"v": PROTOCOL_VERSION, "id": 1, "body": {}},
    {"v": PROTOCOL_VERSION, "id": 1, "status": 200},
])
def test_malformed_reply(msg):
    with pytest.raises(E.BadRequest, match="malformed reply"):
        P.decode_reply(P.pack(msg))


# ---- malformed requests -----------------------------------------------------------------------

def bad(frame: bytes) -> E.BadRequest:
    with pytest.raises(E.BadRequest) as ei:
        P.decode_request(frame)
    e = ei.value
    assert e.status == 400
    assert e.reason
    return e


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x92\x01", b"\xde\xad\xbe\xef\x00\x01",
                                   b"\x81\xa1v", b"not msgpack at all" * 3])
def test_garbage_bytes(frame):
    e = bad(frame)
    assert "malformed message" in e.reason or "protocol version" in e.reason


def test_invalid_msgpack_names_msgpack():
    assert "msgpack" in bad(b"\xc1").reason


def test_trailing_data_is_malformed():
    frame = P.encode_request("x", 1, {}) + b"\x00"
    assert "msgpack" in bad(frame).reason


@pytest.mark.parametrize("obj", [[1, 2, 3], "hello", 42, None, b"bytes", 1.5, True])
def test_non_map_msgpack(obj):
    e = bad(P.pack(obj))
    assert "expected a map" in e.reason


@pytest.mark.parametrize("v", [0, 1, 3, 99, "2", None])
def test_wrong_version(v):
    msg = {"op": "x", "id": 1, "body": {}}
    if v is not None:
        msg["v"] = v
    e = bad(P.pack(msg))
    assert "unsupported protocol version" in e.reason
    assert f"[{PROTOCOL_VERSION}]" in e.reason


@pytest.mark.parametrize("rid", ["missing", "1", 1.0, None, True, [1]])
def test_bad_id(rid):
    msg = {"v": PROTOCOL_VERSION, "op": "x", "body": {}}
    if rid != "missing":
        msg["id"] = rid
    e = bad(P.pack(msg))
    assert "[id] must be an integer" in e.reason


@pytest.mark.parametrize("op", ["missing", 1, None, b"op", ["x"], {"a": 1}])
def test_bad_op(op):
    msg = {"v": PROTOCOL_VERSION, "id": 1, "body": {}}
    if op != "missing":
        msg["op"] = op
    e = bad(P.pack(msg))
    assert "[op] must be a string" in e.reason


@pytest.mark.parametrize("body", [[1], "x", 3, b"b", True])
def test_body_not_a_map(body):
    e = bad(P.pack({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "body": body}))
    assert "[body] must be a map" in e.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_decode_request_arbitrary_bytes_only_bad_request(frame):
    try:
        req = P.decode_request(frame)
    except E.BadRequest as e:
        assert e.status == 400 and e.reason
    else:
        assert isinstance(req.op, str) and isinstance(req.body, dict)
        assert isinstance(req.id, int) and not isinstance(req.id, bool)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-10, 10), children, max_size=4),
    max_leaves=15)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "op", "id", "body", "x"]), msgpack_values,
                       max_size=5))
def test_decode_request_arbitrary_maps_only_bad_request(msg):
    frame = P.pack(msg)
    try:
        req = P.decode_request(frame)
    except E.BadRequest as e:
        assert e.status == 400 and e.reason
    else:
        assert isinstance(req.op, str) and isinstance(req.body, dict)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_decode_reply_arbitrary_bytes_only_bad_request(frame):
    try:
        P.decode_reply(frame)
    except E.BadRequest:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_peek_request_answers_an_op_and_id_or_an_envelope_error(frame):
    try:
        op, rid = P.peek_request(frame)
        assert isinstance(op, str) and isinstance(rid, int)
    except P.EnvelopeError as e:
        assert isinstance(e.request_id, int)


# ---- arrays -----------------------------------------------------------------------------------

def same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert isinstance(b, np.ndarray)
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes()


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([np.pi, -0.0, np.inf, -np.inf, np.nan, 5e-324], dtype=np.float64),
    np.array([[-(2**63), 2**63 - 1], [0, -1]], dtype=np.int64),
    np.arange(256, dtype=np.uint8).reshape(4, 8, 8),
    np.array([True, False, True]),
    np.array([[1, 2], [3, 4]], dtype=np.int32),
    np.array([1.5, -2.25], dtype=np.float16),
    np.array([1 + 2j], dtype=np.complex64),
    np.array([1, -1], dtype=np.int8),
    np.zeros((0,), dtype=np.float32),
    np.zeros((2, 0, 3), dtype=np.int64),
    np.ones((1, 1, 1, 1), dtype=np.float64),
]
ARRAY_IDS = [f"{a.dtype}-{'x'.join(map(str, a.shape)) or 'scalar'}" for a in ARRAYS]


@pytest.mark.parametrize("arr", ARRAYS, ids=ARRAY_IDS)
def test_array_round_trip_tree(arr):
    wire = P.encode_tree(arr)
    assert P.is_array(wire)
    assert wire["shape"] == list(arr.shape)
    assert isinstance(wire["data"], (bytes, memoryview)) and len(wire["data"]) == arr.nbytes
    same_array(arr, P.decode_tree(wire))


@pytest.mark.parametrize("arr", ARRAYS, ids=ARRAY_IDS)
def test_array_round_trip_msgpack(arr):
    frame = P.pack({"docs": [{"input": P.encode_tree(arr)}]})
    back = P.decode_tree(P.unpack(frame))
    same_array(arr, back["docs"][0]["input"])


@pytest.mark.parametrize("arr", [np.array(3.5, dtype=np.float32), np.array(7, dtype=np.int64),
                                 np.array(True), np.array(200, dtype=np.uint8)],
                         ids=["float32", "int64", "bool", "uint8"])
def test_zero_dim_array_round_trip(arr):
    """SPEC: arrays reach the model unchanged; a 0-d array must stay 0-d (shape ())."""
    wire = P.encode_tree(arr)
    assert wire["shape"] == []
    back = P.decode_tree(P.unpack(P.pack(wire)))
    same_array(arr, back)


def test_big_endian_array_round_trip():
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    back = P.decode_tree(P.unpack(P.pack(P.encode_tree(arr))))
    assert back.dtype == np.dtype(">i4")
    assert np.array_equal(back, arr)


def test_fortran_and_strided_arrays_are_sent_in_c_order():
    f = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    back = P.decode_tree(P.encode_tree(f))
    assert np.array_equal(back, f)
    s = np.arange(20, dtype=np.int64)[::3]
    back = P.decode_tree(P.encode_tree(s))
    assert np.array_equal(back, s)
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T
    wire = P.encode_tree(t)
    assert wire["data"] == np.ascontiguousarray(t).tobytes()
    assert np.array_equal(P.decode_tree(wire), t)


def test_tree_with_nested_arrays_and_plain_values():
    tree = {"inputs": [np.ones((2, 2), np.float32), np.arange(3)], "text": "hi", "n": 3,
            "inner": {"mask": np.array([True, False])}, "tuple": (np.zeros(1, np.uint8), 1)}
    back = P.decode_tree(P.unpack(P.pack(P.encode_tree(tree))))
    same_array(tree["inputs"][0], back["inputs"][0])
    same_array(tree["inputs"][1], back["inputs"][1])
    same_array(tree["inner"]["mask"], back["inner"]["mask"])
    same_array(tree["tuple"][0], back["tuple"][0])
    assert back["text"] == "hi" and back["n"] == 3 and back["tuple"][1] == 1


def test_map_with_extra_keys_is_not_an_array():
    obj = {"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "extra": 1}
    assert not P.is_array(obj)
    assert P.decode_tree(obj) == obj


@pytest.mark.parametrize("obj,needle", [
    ({"dtype": "nope", "shape": [1], "data": b"\x00" * 4}, "nope"),
    ({"dtype": "float32", "shape": [3], "data": b"\x00" * 4}, ""),
    ({"dtype": "float32", "shape": [1], "data": b"\x00" * 3}, ""),
    ({"dtype": "float32", "shape": [1], "data": "text"}, "bytes"),
    ({"dtype": "object", "shape": [1], "data": b"\x00" * 8}, ""),
    ({"dtype": "float32", "shape": "x", "data": b"\x00" * 4}, ""),
    ({"dtype": "float32", "shape": [-1, 5], "data": b"\x00" * 4}, ""),
    ({"dtype": None, "shape": [1], "data": b"\x00" * 4}, ""),
])
def test_invalid_wire_arrays_are_bad_requests(obj, needle):
    with pytest.raises(E.BadRequest) as ei:
        P.decode_array(obj, where="inputs[0]")
    assert "[inputs[0]] is not a valid array" in ei.value.reason
    assert needle in ei.value.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "int64", "bool", "uint8", "object", "O", "U4", "x", "",
                              "<f8", ">i2", "V3"]) | msgpack_values,
    "shape": st.lists(st.integers(-2**63, 2**64 - 1) | st.integers(-3, 6), max_size=4)
    | msgpack_values,
    "data": st.binary(max_size=64) | msgpack_values}))
def test_decode_array_arbitrary_maps_only_bad_request(obj):
    try:
        arr = P.decode_array(obj)
    except E.BadRequest as e:
        assert "is not a valid array" in e.reason
    else:
        assert isinstance(arr, np.ndarray) and not arr.dtype.hasobject


def test_to_jsonable():
    tree = {"a": np.array([[1, 2], [3, 4]]), "b": np.float32(1.5), "c": b"\x01\xff",
            "d": P.encode_array(np.array([1.0, 2.0])), "e": (1, 2)}
    assert P.to_jsonable(tree) == {"a": [[1, 2], [3, 4]], "b": 1.5, "c": "01ff", "d": [1.0, 2.0],
                                   "e": [1, 2]}


_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8,
           np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(dtype=st.sampled_from(_DTYPES).map(np.dtype),
                  shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_property_array_round_trip(arr):
    via_tree = P.decode_tree(P.encode_tree(arr))
    same_array(arr, via_tree)
    via_msgpack = P.decode_tree(P.unpack(P.pack(P.encode_tree({"x": [arr]}))))["x"][0]
    same_array(arr, via_msgpack)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(dtype=st.sampled_from(_DTYPES).map(np.dtype),
                  shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
def test_property_array_round_trip_including_0d(arr):
    same_array(arr, P.decode_tree(P.unpack(P.pack(P.encode_tree(arr)))))


# ---- typed messages ---------------------------------------------------------------------------

def test_decode_start_deployment_defaults():
    msg = M.decode(M.StartDeployment, {"model_id": "m"})
    assert msg == M.StartDeployment(model_id="m")
    assert msg.threads_per_allocation == 1 and msg.queue_capacity == 1024
    assert msg.timeout == "30s" and msg.wait_for == "started" and msg.priority == "normal"


def test_encode_decode_round_trip_all_fields():
    msg = M.StartDeployment(model_id="m", deployment_id="d", number_of_allocations=2,
                            threads_per_allocation=4, queue_capacity=10, priority="low",
                            cache_size="10kb", timeout="1m", wait_for="starting",
                            adaptive_allocations={"enabled": True})
    body = M.encode(msg)
    assert M.decode(M.StartDeployment, P.unpack(P.pack(body))) == msg


def test_round_trip_bytes_and_defaults_factory():
    msg = M.PutModelChunk(upload_id="0123456789abcdef", offset=0, data=b"\x00\x01")
    assert M.decode(M.PutModelChunk, P.unpack(P.pack(M.encode(msg)))) == msg
    reg = M.Register(node_id="n", hostname="h", transport_address="tcp://x:1",
                     allocated_processors=4, cpu={"physical": 2, "logical": 4},
                     memory={"total_bytes": 1, "available_bytes": 1}, pid=1)
    assert M.decode(M.Register, M.encode(reg)) == reg
    assert reg.deployments == []


def test_decode_bytes_like():
    assert M.decode(M.PutModelChunk, {"upload_id": "0123456789abcdef", "offset": 0,
                                      "data": bytearray(b"ab")}).data == b"ab"


def test_decode_unknown_field_named():
    with pytest.raises(E.BadRequest) as ei:
        M.decode(M.StartDeployment, {"model_id": "m", "bogus": 1}, op="start_deployment")
    assert ei.value.reason == "request [start_deployment] does not support parameter [bogus]"


def test_decode_several_unknown_fields_named_sorted():
    with pytest.raises(E.BadRequest) as ei:
        M.decode(M.GetStats, {"zz": 1, "aa": 2})
    assert "[aa, zz]" in ei.value.reason and "GetStats" in ei.value.reason


def test_decode_missing_required():
    with pytest.raises(E.BadRequest) as ei:
        M.decode(M.StartDeployment, {})
    assert ei.value.reason == "[model_id] is required"


@pytest.mark.parametrize("cls,body,field,kind", [
    (M.StartDeployment, {"model_id": 5}, "model_id", "a string"),
    (M.StartDeployment, {"model_id": "m", "threads_per_allocation": "2"}, "threads_per_allocation",
     "an integer"),
    (M.StartDeployment, {"model_id": "m", "threads_per_allocation": 2.0},
     "threads_per_allocation", "an integer"),
    (M.StartDeployment, {"model_id": "m", "threads_per_allocation": True},
     "threads_per_allocation", "an integer"),
    (M.StartDeployment, {"model_id": "m", "number_of_allocations": "1"}, "number_of_allocations",
     "an integer"),
    (M.StartDeployment, {"model_id": "m", "number_of_allocations": False},
     "number_of_allocations", "an integer"),
    (M.StartDeployment, {"model_id": "m", "adaptive_allocations": [1]}, "adaptive_allocations",
     "a map"),
    (M.StartDeployment, {"model_id": "m", "cache_size": [1]}, "cache_size", ""),
    (M.StartDeployment, {"model_id": "m", "timeout": None}, "timeout", ""),
    (M.StopDeployment, {"deployment_id": "d", "force": 1}, "force", "a boolean"),
    (M.StopDeployment, {"deployment_id": "d", "force": "true"}, "force", "a boolean"),
    (M.Docs, {"docs": {"a": 1}}, "docs", "a list"),
    (M.Infer, {"deployment_id": "d", "timeout_ms": "10s"}, "timeout_ms",
     "an integer"),
    (M.PutModelChunk, {"upload_id": "u", "offset": 0, "data": "text"}, "data", "bytes"),
    (M.Heartbeat, {"node_id": "n", "memory": []}, "memory", "a map"),
])
def test_decode_wrong_types_name_field(cls, body, field, kind):
    with pytest.raises(E.BadRequest) as ei:
        M.decode(cls, body)
    reason = ei.value.reason
    assert ei.value.status == 400
    assert reason.startswith(f"[{field}] must be"), reason
    assert kind in reason


def test_decode_accepts_union_and_optional():
    assert M.decode(M.StartDeployment, {"model_id": "m", "cache_size": 1024}).cache_size == 1024
    assert M.decode(M.StartDeployment, {"model_id": "m", "cache_size": "1kb"}).cache_size == "1kb"
    assert M.decode(M.StartDeployment, {"model_id": "m", "cache_size": None}).cache_size is None
    assert M.decode(M.StartDeployment, {"model_id": "m", "timeout": 5}).timeout == 5
    assert M.decode(M.StartDeployment, {"model_id": "m", "number_of_allocations": None}) \
        .number_of_allocations is None


def test_decode_empty_message():
    assert M.decode(M.Empty, {}) == M.Empty()
    with pytest.raises(E.BadRequest):
        M.decode(M.Empty, {"x": 1})


# ---- value rules (declared per field, checked at decode) -----------------------------------------

NAN, INF = float("nan"), float("inf")
SHA = "ab" * 32
UPLOAD = "0123456789abcdef"
STATS = {"inference_count": 3, "error_count": 0, "timeout_count": 0, "rejected_execution_count": 0,
         "inference_cache_hit_count": 1, "average_inference_time_ms": 1.5,
         "average_inference_time_ms_excluding_cache_hits": 2.25, "average_queue_time_ms": 0.0,
         "number_of_pending_requests": 0, "throughput_last_minute": 3, "peak_throughput_per_minute": 3,
         "cache_bytes": 128, "average_batch_size": 1.0, "start_time": 1_700_000_000_000, "last_access": None}


def report(**kw):
    r = {"deployment_id": "dep", "routing_state": "started", "current_allocations": 1,
         "target_allocations": 1, "reason": "", "stats": dict(STATS)}
    r.update(kw)
    return r


def register(**kw):
    b = {"node_id": "node-a", "hostname": "host-1.example", "transport_address": "tcp://10.0.0.1:7601",
         "allocated_processors": 8, "cpu": {"physical": 4, "logical": 8},
         "memory": {"total_bytes": 16 << 30, "available_bytes": 8 << 30}, "pid": 4242,
         "deployments": [report()]}
    b.update(kw)
    return b


def nest(depth: int):
    out: object = 1
    for _ in range(depth):
        out = [out]
    return out


def rule_errors(cls, body) -> list[str]:
    """The value-rule messages of a body whose types are right (400, validation format)."""
    with pytest.raises(E.ValidationError) as ei:
        M.decode(cls, body)
    e = ei.value
    assert e.status == 400 and e.type == "action_request_validation_exception"
    assert e.reason == "Validation Failed: " + "".join(f"{i}: {m};" for i, m in enumerate(e.messages, 1))
    return e.messages


def one_error(cls, body) -> str:
    msgs = rule_errors(cls, body)
    assert len(msgs) == 1, msgs
    return msgs[0]


def test_agent_bodies_as_agents_send_them_pass():
    import os
    import socket

    import psutil
    vm = psutil.virtual_memory()
    body = register(node_id="gpu-host-1", hostname=socket.gethostname(), pid=os.getpid(),
                    allocated_processors=psutil.cpu_count() or 1,
                    cpu={"physical": psutil.cpu_count(logical=False) or 1,
                         "logical": psutil.cpu_count() or 1},
                    memory={"total_bytes": vm.total, "available_bytes": vm.available},
                    deployments=[report(), report(deployment_id="other", routing_state="failed",
                                                  current_allocations=0, reason="x" * 1100,
                                                  stats={**STATS, "last_access": 1_700_000_000_123})])
    msg = M.decode(M.Register, P.unpack(P.pack(body)))
    assert msg.deployments == body["deployments"]
    hb = M.decode(M.Heartbeat, {"node_id": "gpu-host-1", "memory": body["memory"], "deployments": []})
    assert hb.node_id == "gpu-host-1"
    for r in body["deployments"]:
        assert M.decode(M.RouteReport, r).deployment_id == r["deployment_id"]


def test_node_assignment_as_the_coordinator_builds_it_passes():
    a = M.NodeAssignment(deployment_id="dep", model_id="m", sha256=SHA, model_bytes=1844, task="pass_through",
                         threads_per_allocation=2, target_allocations=3, queue_capacity=1024,
                         cache_size_bytes=1844, priority="normal", routing_version=1_700_000_000_000,
                         tokenizer_sha256=None, model_config={"pooling": "mean", "normalize": True},
                         max_batch_size=8, max_batch_delay_ms=5.0)
    M.validate(a)
    assert M.decode(M.NodeAssignment, P.unpack(P.pack(M.encode(a)))) == a


@pytest.mark.parametrize("cls,body,field", [
    (M.StartDeployment, {"model_id": "m", "max_batch_delay": NAN}, "max_batch_delay"),
    (M.StartDeployment, {"model_id": "m", "max_batch_delay": INF}, "max_batch_delay"),
    (M.StartDeployment, {"model_id": "m", "timeout": -INF}, "timeout"),
    (M.StartDeployment, {"model_id": "m", "timeout": NAN}, "timeout"),
    (M.NodeAssignment, None, "max_batch_delay_ms"),
    (M.RouteReport, report(stats={**STATS, "average_inference_time_ms": NAN}),
     "stats.average_inference_time_ms"),
    (M.RouteReport, report(stats={**STATS, "average_batch_size": INF}), "stats.average_batch_size"),
    (M.Docs, {"docs": [{"input": [1.0, NAN]}]}, "docs[0].input[1]"),
    (M.Docs, {"docs": [{"x": {"y": -INF}}]}, "docs[0].x.y"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"other": [NAN]}},
     "model_config.other[0]"),
])
def test_non_finite_numbers_are_rejected_everywhere(cls, body, field):
    if body is None:  # NodeAssignment: every required field, then the NaN
        body = M.encode(M.NodeAssignment(deployment_id="d", model_id="m", sha256=SHA, model_bytes=1,
                                         task="pass_through", threads_per_allocation=1, target_allocations=1,
                                         queue_capacity=1, cache_size_bytes=0, priority="normal",
                                         max_batch_delay_ms=NAN))
    msg = one_error(cls, body)
    assert msg.startswith(f"[{field}] must be a finite number"), msg


def test_the_reported_nan_delay_is_rejected_before_any_handler():
    # seen on main: start_deployment(max_batch_delay=NaN) passed validation and the coordinator exited
    body = P.unpack(P.pack({"model_id": "m", "max_batch_delay": NAN}))
    assert one_error(M.StartDeployment, body) == "[max_batch_delay] must be a finite number, got [nan]"


@pytest.mark.parametrize("body,expected", [
    (register(allocated_processors=0), "[allocated_processors] must be greater than or equal to 1"),
    (register(allocated_processors=10**9), "[allocated_processors] must be less than or equal to 4096"),
    (register(allocated_processors=4097), "[allocated_processors] must be less than or equal to 4096"),
    (register(pid=0), "[pid] must be greater than or equal to 1"),
    (register(pid=(1 << 22) + 1), "[pid] must be less than or equal to 4194304"),
    (register(memory={"total_bytes": -1, "available_bytes": 0}),
     "[memory.total_bytes] must be greater than or equal to 0"),
    (register(memory={"total_bytes": (1 << 50) + 1, "available_bytes": 0}),
     "[memory.total_bytes] must be less than or equal to 1125899906842624"),
    (register(memory={"total_bytes": 2**64 - 1, "available_bytes": 0}),
     "[memory.total_bytes] must be less than or equal to 1125899906842624"),
    (register(cpu={"physical": 0, "logical": 1}), "[cpu.physical] must be greater than or equal to 1"),
    (register(cpu={"physical": 1, "logical": 5000}), "[cpu.logical] must be less than or equal to 4096"),
    (register(deployments=[report(current_allocations=-1)]),
     "[deployments[0].current_allocations] must be greater than or equal to 0"),
    (register(deployments=[report(target_allocations=10**6)]),
     "[deployments[0].target_allocations] must be less than or equal to 100000"),
    (register(deployments=[report(stats={**STATS, "inference_count": -5})]),
     "[deployments[0].stats.inference_count] must be greater than or equal to 0"),
    (register(deployments=[report(stats={**STATS, "start_time": 2**63})]),
     "[deployments[0].stats.start_time] must be less than or equal to 253402300799999"),
    (register(deployments=[report(stats={**STATS, "average_queue_time_ms": -1.0})]),
     "[deployments[0].stats.average_queue_time_ms] must be greater than or equal to 0"),
])
def test_register_ranges(body, expected):
    assert one_error(M.Register, body) == expected


@pytest.mark.parametrize("cls,body,expected", [
    (M.ModelChunk, {"sha256": SHA, "offset": -1, "length": 1}, "[offset] must be greater than or equal to 0"),
    (M.ModelChunk, {"sha256": SHA, "offset": 2**64 - 1, "length": 1},
     "[offset] must be less than or equal to 1125899906842624"),
    (M.ModelChunk, {"sha256": SHA, "offset": 0, "length": 0}, "[length] must be greater than or equal to 1"),
    (M.ModelChunk, {"sha256": SHA, "offset": 0, "length": (8 << 20) + 1},
     "[length] must be less than or equal to 8388608"),
    (M.PutModelChunk, {"upload_id": UPLOAD, "offset": -1, "data": b""},
     "[offset] must be greater than or equal to 0"),
    (M.AwaitRoutes, {"deployment_id": "d", "timeout_ms": 0}, "[timeout] must be positive"),
    (M.AwaitRoutes, {"deployment_id": "d", "timeout_ms": -2**63}, "[timeout] must be positive"),
    (M.AwaitRoutes, {"deployment_id": "d", "timeout_ms": 3_600_001},
     "[timeout_ms] must be less than or equal to 3600000"),
    (M.Infer, {"deployment_id": "d", "timeout_ms": 0}, "[timeout] must be positive"),
    (M.Infer, {"deployment_id": "d", "timeout_ms": 2**64 - 1},
     "[timeout_ms] must be less than or equal to 3600000"),
])
def test_int_ranges(cls, body, expected):
    assert one_error(cls, body) == expected


def test_range_edges_are_accepted():
    M.decode(M.Register, register(allocated_processors=4096, pid=1 << 22,
                                  memory={"total_bytes": 1 << 50, "available_bytes": 0},
                                  cpu={"physical": 1, "logical": 4096}))
    M.decode(M.ModelChunk, {"sha256": SHA, "offset": 1 << 50, "length": 8 << 20})
    M.decode(M.Infer, {"deployment_id": "d", "timeout_ms": 3_600_000})
    M.decode(M.AwaitRoutes, {"deployment_id": "d", "timeout_ms": 1})


ID_MSG = ("Invalid [{0}]; [{1}] can contain lowercase alphanumeric (a-z and 0-9), hyphens, periods or "
          "underscores; must start and end with alphanumeric and be at most 64 characters")


@pytest.mark.parametrize("cls,field", [
    (M.DeleteModel, "model_id"), (M.DeploymentRef, "deployment_id"), (M.StopDeployment, "deployment_id"),
    (M.UpdateDeployment, "deployment_id"), (M.AwaitRoutes, "deployment_id"), (M.Infer, "deployment_id"),
    (M.StartDeployment, "model_id"), (M.GetStats, "deployment_id"), (M.GetModels, "model_id"),
])
@pytest.mark.parametrize("bad", ["UPPER", "-start", "end-", "has space", "a" * 65, "sl/ash", "", "é",
                                 "a\x00", "trailing\n"])
def test_model_and_deployment_ids(cls, field, bad):
    body = {}
    body[field] = bad
    assert one_error(cls, body) == ID_MSG.format(field, bad[:80])


@pytest.mark.parametrize("good", ["a", "my-model", "m.v1_2", "a" * 64, "0"])
def test_valid_ids(good):
    assert M.decode(M.DeploymentRef, {"deployment_id": good}).deployment_id == good


def test_get_stats_and_models_also_take_all():
    for v in ("_all", "*"):
        assert M.decode(M.GetStats, {"deployment_id": v}).deployment_id == v
        assert M.decode(M.GetModels, {"model_id": v}).model_id == v


def test_a_ten_thousand_character_id_is_rejected_without_echoing_it():
    msg = one_error(M.DeleteModel, {"model_id": "x" * 10_000})
    assert msg == "[model_id] must be at most 4096 characters long"
    msg = one_error(M.DeleteModel, {"model_id": "x" * 4000})
    assert msg == ID_MSG.format("model_id", "x" * 80)


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "-x", "x" * 129, "é", "a\nb", "agent/x"])
def test_node_ids(bad):
    msg = one_error(M.Heartbeat, {"node_id": bad, "memory": {"total_bytes": 1, "available_bytes": 1}})
    assert msg.startswith("Invalid [node_id]") or msg.startswith("[node_id] must be at most"), msg


@pytest.mark.parametrize("good", ["node-a", "gpu-host-1", "Host_1.example.com", "10.0.0.1:7601", "x" * 128])
def test_node_ids_accepted(good):
    body = {"node_id": good, "memory": {"total_bytes": 1, "available_bytes": 1}}
    assert M.decode(M.Heartbeat, body).node_id == good


@pytest.mark.parametrize("cls,body,expected", [
    (M.PutModelChunk, {"upload_id": "u", "offset": 0, "data": b""},
     "[upload_id] must be 16 to 64 lowercase hex characters"),
    (M.PutModelChunk, {"upload_id": "0123456789ABCDEF", "offset": 0, "data": b""},
     "[upload_id] must be 16 to 64 lowercase hex characters"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA.upper()},
     "[sha256] must be 64 lowercase hex characters"),
    (M.ModelChunk, {"sha256": "../../etc/passwd", "offset": 0, "length": 1},
     "[sha256] must be 64 lowercase hex characters"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "task": "regression"},
     "invalid [task] [regression]; must be one of [pass_through,text_embedding,text_classification,ner]"),
    (M.RouteReport, report(routing_state="running"),
     "invalid [routing_state] [running]; must be one of [starting,started,stopping,stopped,failed]"),
    (M.RouteReport, report(reason="r" * 4097), "[reason] must be at most 4096 characters long"),
    (M.Register, register(hostname="bad\x00host"),
     "[hostname] must be 1 to 255 characters without control characters"),
    (M.Register, register(hostname="h" * 256), "[hostname] must be at most 255 characters long"),
    (M.Register, register(transport_address="nowhere"),
     "[transport_address] must be an endpoint such as tcp://host:port, got [nowhere]"),
    (M.NodeAssignment, None, "invalid [priority] [urgent]; must be one of [normal,low]"),
])
def test_string_rules(cls, body, expected):
    if body is None:
        body = M.encode(M.NodeAssignment(deployment_id="d", model_id="m", sha256=SHA, model_bytes=1,
                                         task="pass_through", threads_per_allocation=1, target_allocations=1,
                                         queue_capacity=1, cache_size_bytes=0, priority="urgent"))
    assert one_error(cls, body) == expected


@pytest.mark.parametrize("cls,body,expected", [
    (M.Register, register(memory={"total_bytes": 1}), "[memory.available_bytes] is required"),
    (M.Register, register(memory={"total_bytes": 1, "available_bytes": 1, "swap": 1}),
     "[memory] does not support [swap]"),
    (M.Register, register(cpu={"physical": 1, "logical": 1, "ghz": 3}), "[cpu] does not support [ghz]"),
    (M.Heartbeat, {"node_id": "n", "memory": {"total_bytes": "x", "available_bytes": 1}},
     "[memory.total_bytes] must be an integer, got ['x']"),
    (M.Heartbeat, {"node_id": "n", "memory": {"total_bytes": True, "available_bytes": 1}},
     "[memory.total_bytes] must be an integer"),
    (M.Heartbeat, {"node_id": "n", "memory": {"total_bytes": 1.5, "available_bytes": 1}},
     "[memory.total_bytes] must be an integer, got [1.5]"),
    (M.Register, register(deployments=[report(stats={"bogus": 1})]),
     "[deployments[0].stats] does not support [bogus]"),
    (M.Register, register(deployments=[report(stats={**STATS, "start_time": "yesterday"})]),
     "[deployments[0].stats.start_time] must be an integer, got ['yesterday']"),
    (M.Register, register(deployments=[7]), "[deployments[0]] must be a map, got [7]"),
    (M.Register,
     register(deployments=[{"deployment_id": "d", "current_allocations": 0, "target_allocations": 0}]),
     "[deployments[0].routing_state] is required"),
    (M.Register, register(deployments=[report(extra=1)]), "[deployments[0]] does not support [extra]"),
    (M.Register, register(deployments=[report(stats=[])]), "[deployments[0].stats] must be a map, got [[]]"),
    (M.StartDeployment, {"model_id": "m", "adaptive_allocations": {"enabled": True, "bogus": 1}},
     "[adaptive_allocations] does not support [bogus]"),
    (M.PutModel,
     {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"max_sequence_length": 0}},
     "[model_config.max_sequence_length] must be greater than or equal to 1"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"normalize": "yes"}},
     "[model_config.normalize] must be a boolean, got ['yes']"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"blob": b"\x00"}},
     "[model_config.blob] must not be bytes"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"m": {1: "x"}}},
     "[model_config.m] keys must be strings, got [1]"),
])
def test_map_shapes(cls, body, expected):
    assert one_error(cls, body) == expected


def test_every_broken_rule_is_reported_at_once_with_its_path():
    body = register(allocated_processors=10**9, pid=0, hostname="",
                    memory={"total_bytes": "x", "available_bytes": -1}, cpu={"physical": 0},
                    deployments=[report(routing_state="zzz", current_allocations=-1,
                                        stats={"inference_count": NAN}), 5])
    assert rule_errors(M.Register, body) == [
        "[hostname] must be 1 to 255 characters without control characters",
        "[allocated_processors] must be less than or equal to 4096",
        "[cpu.logical] is required",
        "[cpu.physical] must be greater than or equal to 1",
        "[memory.total_bytes] must be an integer, got ['x']",
        "[memory.available_bytes] must be greater than or equal to 0",
        "[pid] must be greater than or equal to 1",
        "invalid [deployments[0].routing_state] [zzz]; "
        "must be one of [starting,started,stopping,stopped,failed]",
        "[deployments[0].current_allocations] must be greater than or equal to 0",
        "[deployments[0].stats.inference_count] must be an integer, got [nan]",
        "[deployments[1]] must be a map, got [5]",
    ]


def test_type_errors_come_first_and_alone():
    with pytest.raises(E.BadRequest) as ei:
        M.decode(M.Register, register(allocated_processors="8", pid=0))
    assert not isinstance(ei.value, E.ValidationError)
    assert ei.value.reason == "[allocated_processors] must be an integer, got ['8']"


@pytest.mark.parametrize("cls,body,expected", [
    (M.Docs, {"docs": [{}] * 10_001}, "[docs] must have at most 10000 elements"),
    (M.Register, register(deployments=[report()] * 4097), "[deployments] must have at most 4096 elements"),
    (M.Docs, {"docs": [nest(20)]}, "is nested too deeply (at most 16 levels)"),
    (M.Docs, {"docs": [{"input": list(range(1_000_001))}]},
     "[docs] must have at most 1000000 values in all"),
    (M.PutModel,
     {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {str(i): i for i in range(65)}},
     "[model_config] must have at most 64 entries"),
    (M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": {"x": nest(9)}},
     "is nested too deeply (at most 8 levels)"),
    (M.StartDeployment, {"model_id": "m", "timeout": "9" * 65 + "s"},
     "[timeout] must be at most 64 characters long"),
])
def test_sizes_and_depth(cls, body, expected):
    assert expected in one_error(cls, body)


def test_deep_nesting_does_not_recurse():
    # deeper than the interpreter's recursion limit: the walk is iterative
    msg = one_error(M.Docs, {"docs": [nest(5000)]})
    assert "nested too deeply" in msg


def test_a_model_config_put_accepts_reaches_the_agent():
    cfg = {"pooling": "weird", "normalize": False, "max_sequence_length": 512, "embedding_size": 384,
           "source": "minilm", "notes": {"a": [1, 2.5, "x", None, True]}}
    put = M.decode(M.PutModel, {"model_id": "m", "upload_id": UPLOAD, "sha256": SHA, "model_config": cfg})
    a = M.NodeAssignment(deployment_id="d", model_id="m", sha256=SHA, model_bytes=1, task="text_embedding",
                         threads_per_allocation=1, target_allocations=1, queue_capacity=1, cache_size_bytes=0,
                         priority="normal", model_config=put.model_config)
    assert M.decode(M.NodeAssignment, M.encode(a)).model_config == cfg


def test_huge_ints_where_floats_belong_are_a_400():
    with pytest.raises(E.BadRequest) as ei:
        M.decode(M.NodeAssignment, {**M.encode(M.NodeAssignment(
            deployment_id="d", model_id="m", sha256=SHA, model_bytes=1, task="pass_through",
            threads_per_allocation=1, target_allocations=1, queue_capacity=1, cache_size_bytes=0,
            priority="normal")), "max_batch_delay_ms": 10**400})
    assert ei.value.status == 400 and "[max_batch_delay_ms]" in ei.value.reason


def test_validate_checks_messages_built_in_code():
    with pytest.raises(E.ValidationError, match=r"\[allocated_processors\]"):
        M.validate(M.Register(**register(allocated_processors=0)))


_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
              st.text(max_size=8), st.binary(max_size=8),
              st.sampled_from([NAN, INF, -INF, 2**63, "x" * 5000, "", "0" * 64, UPLOAD, "started"])),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=6), ch, max_size=3),
    max_leaves=8)
_CLASSES = [M.PutModelChunk, M.PutModel, M.GetModels, M.DeleteModel, M.StartDeployment, M.UpdateDeployment,
            M.StopDeployment, M.DeploymentRef, M.AwaitRoutes, M.GetStats, M.Empty, M.Infer, M.Docs,
            M.Register, M.Heartbeat, M.ModelChunk, M.RouteReport, M.NodeAssignment, M.RunJobs, M.Results,
            M.WorkerReady, M.Spawn, M.KillWorker, M.HostLoaded, M.HostFailed, M.WorkerSpawned,
            M.WorkerExited]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(_CLASSES), data=st.data())
def test_decode_of_any_body_is_a_message_or_a_400(cls, data):
    import dataclasses
    names = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    body = data.draw(st.dictionaries(st.sampled_from(names), _JUNK, max_size=len(names)))
    try:
        msg = M.decode(cls, body)
    except E.BadRequest as e:
        assert e.status == 400 and e.reason
        return
    M.validate(msg)  # what decode returns obeys every rule


# ---- units ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("1m", 60.0), ("2h", 7200.0), ("1d", 86400.0),
    ("0s", 0.0), ("1.5s", 1.5), ("-1s", -1.0), ("100micros", 1e-4), ("1000nanos", 1e-6),
    (" 10s ", 10.0), ("10S", 10.0), (5, 5.0), (2.5, 2.5),
])
def test_parse_time(value, seconds):
    assert parse_time(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "10", "abc", "10 parsecs", "s", "1.s", True, "1m1s"])
def test_parse_time_errors(value):
    with pytest.raises(ValueError) as ei:
        parse_time(value, "timeout")
    assert f"failed to parse setting [timeout] with value [{value}]" in str(ei.value)


def test_parse_time_names_setting():
    with pytest.raises(ValueError, match=r"\[node_timeout\]"):
        parse_time("x", "node_timeout")


@pytest.mark.parametrize("seconds,text", [
    (30, "30s"), (60, "1m"), (0.5, "500ms"), (7200, "2h"), (86400, "1d"), (90, "90s"),
    (1.5, "1500ms"), (300, "5m"), (0.001, "1ms"), (3600 * 25, "25h"),
])
def test_format_time(seconds, text):
    assert format_time(seconds) == text


@pytest.mark.parametrize("text", ["500ms", "30s", "1m", "2h", "1d", "90s", "1500ms"])
def test_format_parse_time_round_trip(text):
    assert format_time(parse_time(text)) == text


@pytest.mark.parametrize("value,n", [
    ("1kb", 1024), ("1KB", 1024), ("1mb", 1 << 20), ("1gb", 1 << 30), ("1tb", 1 << 40),
    ("1pb", 1 << 50), ("0b", 0), ("0", 0), ("1630b", 1630), ("512kb", 512 * 1024),
    ("100mb", 100 << 20), ("1.5kb", 1536), (" 10 kb ", 10240), (1630, 1630), (0, 0),
])
def test_parse_bytes(value, n):
    assert parse_bytes(value) == n


@pytest.mark.parametrize("value", ["abc", "-1kb", "1 parsec", "kb", "", -1, True, "1.2.3kb"])
def test_parse_bytes_errors(value):
    with pytest.raises(ValueError) as ei:
        parse_bytes(value, "cache_size")
    assert f"failed to parse setting [cache_size] with value [{value}]" in str(ei.value)


@pytest.mark.parametrize("value,text", [
    (1630, "1630b"), (0, "0b"), ("10KB", "10kb"), (" 512 kb ", "512kb"), ("0", "0"),
    ("1gb", "1gb"),
])
def test_normalize_bytes(value, text):
    assert normalize_bytes(value) == text


def test_normalize_bytes_rejects_invalid():
    with pytest.raises(ValueError):
        normalize_bytes("lots")


# ---- errors -----------------------------------------------------------------------------------

ERRORS = [
    (E.BadRequest("bad thing"), E.BadRequest, 400, "status_exception"),
    (E.ValidationError(["[x] must be positive"]), E.BadRequest, 400,
     "action_request_validation_exception"),
    (E.Unauthorized("no key"), E.Unauthorized, 401, "security_exception"),
    (E.Forbidden("role infer may not"), E.Forbidden, 403, "security_exception"),
    (E.NotFound("Could not find trained model [m]"), E.NotFound, 404,
     "resource_not_found_exception"),
    (E.RequestTimeout("Timed out after [30s]"), E.RequestTimeout, 408, "status_exception"),
    (E.Conflict("not started"), E.Conflict, 409, "status_exception"),
    (E.TooManyRequests("queue full", retry_after_ms=250), E.TooManyRequests, 429,
     "es_rejected_execution_exception"),
    (E.TooManyRequests("Could not start deployment because no ML nodes with sufficient capacity "
                       "were found"), E.TooManyRequests, 429, "status_exception"),
    (E.ServerError("node [a] failed: boom"), E.ServerError, 500, "status_exception"),
    (E.ServiceUnavailable("every route failed"), E.ServiceUnavailable, 503, "status_exception"),
]


@pytest.mark.parametrize("err,cls,status,etype", ERRORS, ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_error_body_round_trip(err, cls, status, etype):
    assert err.status == status and err.type == etype
    body = err.to_body()
    assert body["status"] == status
    assert body["error"]["type"] == etype
    assert body["error"]["reason"] == err.reason
    wire = P.unpack(P.pack(body))
    back = E.from_body(wire)
    assert type(back) is cls
    assert isinstance(back, E.ApiError)
    assert (back.status, back.type, back.reason, back.retry_after_ms) == \
        (err.status, err.type, err.reason, err.retry_after_ms)
    assert back.to_body() == body


def test_error_body_shape_has_no_extra_fields_by_default():
    assert E.NotFound("x").to_body() == {"error": {"type": "resource_not_found_exception",
                                                   "reason": "x"}, "status": 404}


def test_too_many_requests_retry_after():
    full = E.TooManyRequests("queue full", retry_after_ms=100)
    assert full.retry_after_ms == 100
    assert full.type == "es_rejected_execution_exception"
    assert full.to_body()["error"]["retry_after_ms"] == 100
    cap = E.TooManyRequests("no capacity")
    assert cap.retry_after_ms is None
    assert cap.type == "status_exception"
    assert "retry_after_ms" not in cap.to_body()["error"]
    back = E.from_body(full.to_body())
    assert isinstance(back, E.TooManyRequests) and back.retry_after_ms == 100
    assert back.type == "es_rejected_execution_exception"
    back = E.from_body(cap.to_body())
    assert isinstance(back, E.TooManyRequests) and back.retry_after_ms is None
    assert back.type == "status_exception"


def test_too_many_requests_zero_retry_after_is_queue_full():
    e = E.TooManyRequests("queue full", retry_after_ms=0)
    assert e.type == "es_rejected_execution_exception"
    assert E.from_body(e.to_body()).retry_after_ms == 0


def test_retryable_round_trip():
    e = E.ServiceUnavailable("try another", retryable=True)
    body = e.to_body()
    assert body["error"]["retryable"] is True
    back = E.from_body(body)
    assert back.retryable is True and isinstance(back, E.ServiceUnavailable)
    q = E.TooManyRequests("full", retry_after_ms=5, retryable=True)
    assert E.from_body(q.to_body()).retryable is True
    assert E.from_body(E.NotFound("x").to_body()).retryable is False


def test_subclass_tree():
    assert issubclass(E.ValidationError, E.BadRequest)
    assert issubclass(E.NoAnswer, E.ServiceUnavailable)
    for cls in (E.BadRequest, E.Unauthorized, E.Forbidden, E.NotFound, E.RequestTimeout,
                E.Conflict, E.TooManyRequests, E.ServerError, E.ServiceUnavailable):
        assert issubclass(cls, E.ApiError)


def test_no_answer():
    e = E.NoAnswer("no answer from tcp://x")
    assert e.status == 503 and e.type == "transport_exception"
    back = E.from_body(e.to_body())
    assert isinstance(back, E.ServiceUnavailable) and back.type == "transport_exception"


def test_unknown_status_and_custom_type():
    back = E.from_body({"error": {"type": "weird_exception", "reason": "teapot"}, "status": 418})
    assert type(back) is E.ApiError
    assert (back.status, back.type, back.reason) == (418, "weird_exception", "teapot")


def test_status_override_keeps_class():
    e = E.ApiError("x", status=418, type="t")
    assert e.to_body() == {"error": {"type": "t", "reason": "x"}, "status": 418}


@pytest.mark.parametrize("body", [None, {}, {"status": 404}, {"error": {"type": "t"}, "status": 1},
                                  {"error": "x", "status": 404}, "string",
                                  {"error": {"type": "t", "reason": "r"}, "status": "abc"}])
def test_from_body_malformed(body):
    e = E.from_body(body)
    assert isinstance(e, E.ApiError)
    assert "malformed error body" in e.reason


def test_str_and_repr():
    e = E.NotFound("gone")
    assert str(e) == "[404] resource_not_found_exception: gone"
    assert "NotFound" in repr(e) and "404" in repr(e)


# ---- payloads: a tree frame and the frames of its large arrays --------------------------------

def _roundtrip(tree):
    frames = P.encode_payload(tree)
    wire = [bytes(f) for f in frames]  # what the other side receives
    return frames, P.decode_tree(P.decode_payload(wire, P.PAYLOAD_LIMITS))


def test_small_arrays_travel_in_the_tree_and_large_ones_in_frames_of_their_own():
    small, large = np.arange(4, dtype=np.float32), np.arange(4096, dtype=np.float32).reshape(64, 64)
    frames, back = _roundtrip([{"input": small}, {"inputs": [large, large.T]}, {"text": "x"}])
    assert len(frames) == 3  # the tree, and one frame per large array
    tree = msgpack.unpackb(frames[0], raw=False)
    assert tree[1]["inputs"][0] == {"dtype": "float32", "shape": [64, 64], "frame": 1}
    assert np.array_equal(back[0]["input"], small)
    assert np.array_equal(back[1]["inputs"][0], large) and np.array_equal(back[1]["inputs"][1], large.T)
    assert back[2] == {"text": "x"}


def test_a_large_contiguous_array_is_sent_by_reference_not_copied():
    x = np.ones((512, 512), np.float32)
    frames = P.encode_payload([{"input": x}])
    assert isinstance(frames[1], memoryview) and np.shares_memory(np.asarray(frames[1]), x)


def test_decoded_arrays_are_views_of_the_received_frames():
    x = np.arange(8192, dtype=np.int64)
    wire = [bytes(f) for f in P.encode_payload([{"input": x}])]
    arr = P.decode_array(P.decode_payload(wire, P.PAYLOAD_LIMITS)[0]["input"])
    assert np.shares_memory(arr, np.frombuffer(wire[1], np.uint8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hnp.arrays(dtype=st.sampled_from(_DTYPES).map(np.dtype),
                          shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=40)), max_size=4))
def test_property_payload_round_trip(arrays):
    _, back = _roundtrip([{"a": a} for a in arrays])
    for a, b in zip(arrays, back, strict=True):
        same_array(a, b["a"])


@pytest.mark.parametrize("tree, frames, needle", [
    ([{"dtype": "float32", "shape": [1], "frame": 2}], [b"x" * 4], "is not an unused payload frame"),
    ([{"dtype": "float32", "shape": [1], "frame": 0}], [b"x" * 4], "is not an unused payload frame"),
    ([{"dtype": "float32", "shape": [1], "frame": "1"}], [b"x" * 4], "is not an unused payload frame"),
    ([{"dtype": "float32", "shape": [1], "frame": 1}] * 2, [b"x" * 4], "is not an unused payload frame"),
    ([{"text": "x"}], [b"x" * 4], "a payload frame no array refers to"),
])
def test_bad_frame_references_are_bad_requests(tree, frames, needle):
    with pytest.raises(E.BadRequest, match=needle):
        P.decode_payload([P.pack(tree), *frames], P.PAYLOAD_LIMITS)


def test_too_many_payload_frames_is_a_bad_request():
    with pytest.raises(E.BadRequest, match="payload frames"):
        P.decode_payload([P.pack([])] + [b"x"] * P.MAX_PAYLOAD_FRAMES, P.PAYLOAD_LIMITS)


def test_payload_key_sees_frame_boundaries_and_bytes():
    assert P.payload_key([b"ab", b"c"]) != P.payload_key([b"a", b"bc"])
    assert P.payload_key([b"ab", b"c"]) == P.payload_key([memoryview(b"ab"), bytearray(b"c")])


def test_an_infer_request_is_a_small_header_and_its_payload():
    x = np.zeros(100_000, np.float32)
    frames = P.encode_infer(5, {"deployment_id": "d", "timeout_ms": 100}, [{"input": x}])
    assert len(frames[0]) < 100 and P.peek_request(frames[0]) == ("infer", 5)
    assert P.decode_request(frames[0]).body == {"deployment_id": "d", "timeout_ms": 100}


def test_decode_message_tells_pushes_from_replies_and_checks_the_version():
    assert isinstance(P.decode_message(P.encode_request("sync", 0, {})), P.Request)
    assert isinstance(P.decode_message(P.encode_reply(3, 200, {})), P.Reply)
    with pytest.raises(E.BadRequest, match="unsupported protocol version"):
        P.decode_message(P.pack({"v": 1, "op": "sync", "id": 0, "body": {}}))


# ---- the model host's pipe ---------------------------------------------------------------------

def test_pipe_messages_split_at_any_boundary():
    stream = b"".join(P.encode_pipe(op, {"n": i}) for i, op in enumerate(["spawn", "kill", "exit"]))
    for cut in range(len(stream) + 1):
        r = P.PipeReader()
        got = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert [(q.op, q.body["n"]) for q in got] == [("spawn", 0), ("kill", 1), ("exit", 2)]


def test_pipe_rejects_oversized_and_foreign_messages():
    with pytest.raises(E.BadRequest, match="more than"):
        P.PipeReader(max_frame=10).feed((11).to_bytes(4, "big"))
    foreign = P.pack({"v": 1, "op": "spawn", "id": 0})
    with pytest.raises(E.BadRequest, match="unsupported protocol version"):
        P.PipeReader().feed(len(foreign).to_bytes(4, "big") + foreign)


# ---- the hot-path decoders agree with the declared types ---------------------------------------

EXTREME_NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 199, 200, 599, 600, 4096, 4097, 10_000, 10_001, 2**63 - 1, 2**63, 1e12,
                     1e12 + 1, 0.5, -0.0, NAN, INF, -INF, True, False]),
    st.integers(), st.floats())

_JOBISH = st.dictionaries(st.sampled_from(["rid", "frames", "status", "docs", "reason", "x"]),
                          st.one_of(EXTREME_NUMBERS, st.text(max_size=5), st.none(), st.booleans()),
                          max_size=5)


def _outcome(fn, body):
    try:
        return fn(body)
    except E.ApiError as e:
        return ("error", type(e), e.status)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.fixed_dictionaries({"jobs": st.lists(_JOBISH, max_size=3)}),
                 st.dictionaries(st.sampled_from(["jobs", "x"]), st.one_of(st.lists(_JOBISH, max_size=2),
                                                                          EXTREME_NUMBERS), max_size=2)))
def test_decode_run_jobs_agrees_with_decode(body):
    assert _outcome(M.decode_run_jobs, body) == _outcome(lambda b: M.decode(M.RunJobs, b, "infer"), body)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.fixed_dictionaries({"time_ms": EXTREME_NUMBERS, "items": st.lists(_JOBISH, max_size=3)}),
                 st.dictionaries(st.sampled_from(["time_ms", "items", "x"]),
                                 st.one_of(st.lists(_JOBISH, max_size=2), EXTREME_NUMBERS), max_size=3)))
def test_decode_results_agrees_with_decode(body):
    assert _outcome(M.decode_results, body) == _outcome(lambda b: M.decode(M.Results, b, "results"), body)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["deployment_id", "timeout_ms", "docs"]),
                       st.one_of(EXTREME_NUMBERS, st.sampled_from(["d", "a-b.c", "UP", "a\n", "", "x" * 65]),
                                 st.text(max_size=6), st.none()), max_size=3))
def test_decode_infer_agrees_with_decode(body):
    assert _outcome(M.decode_infer, body) == _outcome(lambda b: M.decode(M.Infer, b, "infer"), body)


_DOCISH = st.recursive(
    st.one_of(EXTREME_NUMBERS, st.text(max_size=4), st.binary(max_size=4),
              st.binary(max_size=4).map(memoryview), st.none()),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 3)),
                                                          ch, max_size=3),
    max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(_DOCISH, max_size=4), _DOCISH))
def test_decode_docs_agrees_with_decode(tree):
    slow = _outcome(lambda t: M.decode(M.Docs, {"docs": t}, "infer").docs, tree)
    assert _outcome(M.decode_docs, tree) == slow

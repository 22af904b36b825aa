"""The heartbeat memo against the full decode: for any sequence of frames from one connection,
what the memo gives (or the error it raises) is what decoding and checking each frame in full
gives (hypothesis), and frames that are the same but for their id skip the decode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlfleet.common import messages as m
from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import OP_LIMITS, decode_request, encode_request, pack, peek_request, unpack
from mlfleet.coordinator.heartbeat import HeartbeatMemo, parse_reports, spans

pytestmark = pytest.mark.timeout(120)
LIMITS = OP_LIMITS["heartbeat"]
GOOD_MEMORY = {"total_bytes": 64 << 30, "available_bytes": 32 << 30}


def report(state="started", allocations=1, **extra):
    return {"deployment_id": "dep-1", "routing_state": state, "current_allocations": allocations,
            "target_allocations": 1, "reason": "", "stats": {"inference_count": 3}, **extra}


def body_of(frame):
    return decode_request(frame, LIMITS).body


def full(frame):
    """The reference: decode and check everything."""
    peek_request(frame)
    msg = m.decode(m.Heartbeat, body_of(frame), "heartbeat")
    return msg, parse_reports(msg.deployments)


def outcome(fn, frame):
    try:
        msg, reports = fn(frame)
        return ("ok", msg, reports)
    except ApiError as e:
        return ("error", e.status)


def test_a_frame_like_the_last_but_for_its_id_is_not_decoded_again():
    memo = HeartbeatMemo()
    body = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": [report()]}
    first = memo.decode(b"c", encode_request("heartbeat", 1, body), body_of, True)
    again = memo.decode(b"c", encode_request("heartbeat", 2, body), body_of, True)
    assert again == first and (memo.hits, memo.misses) == (1, 1)
    # another connection does not share it
    memo.decode(b"other", encode_request("heartbeat", 3, body), body_of, True)
    assert memo.misses == 2


def test_equal_values_of_another_type_are_not_the_same_input():
    memo = HeartbeatMemo()
    body = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": [report(allocations=1)]}
    memo.decode(b"c", encode_request("heartbeat", 1, body), body_of, True)
    bad = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": [report(allocations=True)]}
    with pytest.raises(ApiError):  # True == 1 in Python; the check still sees a bool
        memo.decode(b"c", encode_request("heartbeat", 2, bad), body_of, True)
    assert memo.hits == 0


def test_new_memory_figures_reuse_the_checked_reports_and_check_the_rest():
    memo = HeartbeatMemo()
    body = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": [report()]}
    memo.decode(b"c", encode_request("heartbeat", 1, body), body_of, True)
    moved = {**body, "memory": {**GOOD_MEMORY, "available_bytes": 1}}
    msg, reports = memo.decode(b"c", encode_request("heartbeat", 2, moved), body_of, True)
    assert memo.partial == 1 and msg.memory == moved["memory"] and reports == full(
        encode_request("heartbeat", 2, moved))[1]
    worse = {**body, "memory": {**GOOD_MEMORY, "available_bytes": -1}}
    with pytest.raises(ApiError):
        memo.decode(b"c", encode_request("heartbeat", 3, worse), body_of, True)


def test_of_many_reports_only_those_that_changed_are_checked_again(monkeypatch):
    from mlfleet.coordinator import heartbeat
    memo = HeartbeatMemo()
    reps = [{**report(), "deployment_id": f"d{i}"} for i in range(50)]
    body = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": reps}
    memo.decode(b"c", encode_request("heartbeat", 1, body), body_of, True)
    checked = []
    real = heartbeat.parse_report
    monkeypatch.setattr(heartbeat, "parse_report", lambda raw: checked.append(raw) or real(raw))
    reps[7] = {**reps[7], "stats": {"inference_count": 4}}
    frame = encode_request("heartbeat", 2, body)
    got = memo.decode(b"c", frame, body_of, True)
    assert checked == [reps[7]] and got == full(frame)
    reps[9] = {**reps[9], "current_allocations": -1}
    with pytest.raises(ApiError):
        memo.decode(b"c", encode_request("heartbeat", 3, body), body_of, True)


def test_an_unregistered_connection_is_not_remembered():
    memo = HeartbeatMemo()
    body = {"node_id": "n1", "memory": GOOD_MEMORY, "deployments": []}
    memo.decode(b"c", encode_request("heartbeat", 1, body), body_of, False)
    assert not memo.seen


def test_spans_cut_out_the_id_and_find_the_deployments():
    a = spans(encode_request("heartbeat", 5, {"node_id": "n", "deployments": [1]}))
    b = spans(encode_request("heartbeat", 1 << 40, {"node_id": "n", "deployments": [1]}))
    assert a is not None and b is not None and a.rest == b.rest and a.items == (pack(1),)
    assert spans(encode_request("heartbeat", 5, {"deployments": 3})) is None  # decoded in full
    assert spans(b"\x93\x01\x02\x03") is None and spans(b"\xc1") is None


def _envelope(rid, body, extra):
    return pack({"v": 1, "op": "heartbeat", "id": rid, "body": body, **extra})


values = st.one_of(st.integers(-2, 3), st.booleans(), st.none(), st.text(max_size=3),
                   st.floats(allow_nan=False, width=32))
reports = st.one_of(
    st.builds(report, st.sampled_from(["started", "starting", "nope"]), st.integers(-1, 2)),
    st.builds(lambda k, v: {**report(), k: v},
              st.sampled_from(["current_allocations", "routing_state", "stats", "extra"]), values),
    values)
bodies = st.one_of(
    st.fixed_dictionaries({"node_id": st.sampled_from(["n1", "n 1"]),
                           "memory": st.sampled_from([GOOD_MEMORY, {"total_bytes": 1}, {
                               "total_bytes": 1, "available_bytes": True}]),
                           "deployments": st.lists(reports, max_size=2)}),
    st.dictionaries(st.sampled_from(["node_id", "memory", "deployments", "x"]), values, max_size=3))
frames = st.builds(lambda rid, body, extra: _envelope(rid, body, extra),
                   st.integers(0, 300), bodies,
                   st.sampled_from([{}, {"x": 1}, {"x": True}]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(frames, st.integers(0, 300)), min_size=1, max_size=6))
def test_the_memo_gives_what_the_full_decode_gives(seq):
    """Each frame, then the same frame with another id (the memo's paths all get taken)."""
    memo = HeartbeatMemo()
    for frame, other_id in seq:
        for f in (frame, pack({**unpack(frame), "id": other_id})):
            try:
                peek_request(f)
            except ApiError:
                continue  # the server answers before it decodes
            assert outcome(lambda x: memo.decode(b"c", x, body_of, True), f) == outcome(full, f)


# ---- model chunk replies (coordinator/bulk.py) ----------------------------------------------

@pytest.mark.parametrize("size,offset,length", [
    (0, 0, 10), (10, 0, 4), (10, 8, 4), (10, 12, 4), (300, 0, 300), (70_000, 5, 69_000),
    (200_000, 0, 150_000)])
def test_a_chunk_reply_is_the_frame_encode_reply_makes(tmp_path, size, offset, length):
    from mlfleet.common.protocol import encode_reply
    from mlfleet.coordinator.bulk import chunk_reply
    data = bytes(i % 251 for i in range(size))
    (tmp_path / "b.bin").write_bytes(data)
    got = chunk_reply("ab", [tmp_path / "a.bin", tmp_path / "b.bin"], 77, offset, length)
    assert bytes(got) == encode_reply(77, 200, {"data": data[offset:offset + length], "size": size})
    with pytest.raises(ApiError) as e:
        chunk_reply("ab", [tmp_path / "none"], 1, 0, 1)
    assert e.value.status == 404

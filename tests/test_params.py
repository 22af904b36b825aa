"""Pure unit tests of common.params: the start/update rules and their exact messages (SPEC.md,
"Parameters and their rules" and "Validation messages")."""

from __future__ import annotations

import pytest

from mlfleet.common.errors import ApiError, BadRequest, ValidationError
from mlfleet.common.messages import StartDeployment
from mlfleet.common.params import Adaptive, StartParams, validate_start, validate_update, wait_for_reached

pytestmark = pytest.mark.timeout(60)

NA_POSITIVE = "[number_of_allocations] must be a positive integer"
NA_ADAPTIVE = "[number_of_allocations] cannot be set if adaptive allocations is enabled"
TPA_POSITIVE = "[threads_per_allocation] must be a positive integer"
TPA_POW2 = "[threads_per_allocation] must be a power of 2 less than or equal to 32"
QC_POSITIVE = "[queue_capacity] must be a positive integer"
QC_MAX = "[queue_capacity] must be less than or equal to 1000000"
TIMEOUT_POSITIVE = "[timeout] must be positive"
NA_LOW = "[number_of_allocations] must be 1 when [priority] is low"
TPA_LOW = "[threads_per_allocation] must be 1 when [priority] is low"
MIN_BAD = "[min_number_of_allocations] must be a non-negative integer or null"
MAX_BAD = "[max_number_of_allocations] must be a positive integer or null"
MIN_GT_MAX = "[min_number_of_allocations] must not be larger than [max_number_of_allocations]"


def wait_for_msg(x: str) -> str:
    return f"invalid [wait_for] state [{x}]; must be one of [started,starting,fully_allocated]"


def start(**kw) -> StartDeployment:
    kw.setdefault("model_id", "my-model")
    return StartDeployment(**kw)


def errors_of(fn, *args, **kw) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        fn(*args, **kw)
    e = ei.value
    assert isinstance(e, BadRequest) and isinstance(e, ApiError)
    assert e.status == 400
    assert e.type == "action_request_validation_exception"
    assert e.reason == "Validation Failed: " + "".join(f"{i}: {m};"
                                                       for i, m in enumerate(e.messages, 1))
    body = e.to_body()
    assert body == {"error": {"type": "action_request_validation_exception", "reason": e.reason},
                    "status": 400}
    return e


def start_errors(**kw) -> list[str]:
    return errors_of(validate_start, start(**kw)).messages


def single(**kw) -> str:
    msgs = start_errors(**kw)
    assert len(msgs) == 1, msgs
    return msgs[0]


# ---- defaults ---------------------------------------------------------------------------------

def test_defaults():
    p = validate_start(start())
    assert isinstance(p, StartParams)
    assert p.model_id == "my-model"
    assert p.deployment_id == "my-model"
    assert p.number_of_allocations == 1
    assert p.threads_per_allocation == 1
    assert p.queue_capacity == 1024
    assert p.priority == "normal"
    assert p.cache_size is None
    assert p.timeout_s == 30.0
    assert p.wait_for == "started"
    assert p.adaptive is None


def test_explicit_values_kept():
    p = validate_start(start(deployment_id="dep-1", number_of_allocations=3,
                             threads_per_allocation=4, queue_capacity=10, cache_size="10kb",
                             timeout="2m", wait_for="fully_allocated"))
    assert (p.deployment_id, p.number_of_allocations, p.threads_per_allocation,
            p.queue_capacity, p.cache_size, p.timeout_s, p.wait_for) == \
        ("dep-1", 3, 4, 10, "10kb", 120.0, "fully_allocated")


def test_adaptive_default_allocations_is_min_when_above_zero():
    p = validate_start(start(adaptive_allocations={"enabled": True,
                                                   "min_number_of_allocations": 3,
                                                   "max_number_of_allocations": 5}))
    assert p.number_of_allocations == 3
    assert p.adaptive == Adaptive(True, 3, 5)


@pytest.mark.parametrize("lo", [0, None])
def test_adaptive_default_allocations_is_one_when_min_zero_or_null(lo):
    p = validate_start(start(adaptive_allocations={"enabled": True,
                                                   "min_number_of_allocations": lo,
                                                   "max_number_of_allocations": 4}))
    assert p.number_of_allocations == 1


def test_adaptive_disabled_min_does_not_set_allocations():
    p = validate_start(start(adaptive_allocations={"enabled": False,
                                                   "min_number_of_allocations": 3}))
    assert p.number_of_allocations == 1
    assert p.adaptive == Adaptive(False, 3, None)


def test_adaptive_disabled_allows_number_of_allocations():
    p = validate_start(start(number_of_allocations=2, adaptive_allocations={"enabled": False}))
    assert p.number_of_allocations == 2


def test_adaptive_enabled_only():
    p = validate_start(start(adaptive_allocations={"enabled": True}))
    assert p.adaptive == Adaptive(True, None, None)
    assert p.number_of_allocations == 1


def test_adaptive_to_body():
    assert Adaptive(True, 0, 4).to_body() == {"enabled": True, "min_number_of_allocations": 0,
                                              "max_number_of_allocations": 4}


# ---- number_of_allocations ------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -1, -100])
def test_number_of_allocations_must_be_positive(n):
    assert single(number_of_allocations=n) == NA_POSITIVE


@pytest.mark.parametrize("n", [1, 2, 100])
def test_number_of_allocations_valid(n):
    assert validate_start(start(number_of_allocations=n)).number_of_allocations == n


def test_number_of_allocations_with_adaptive_enabled():
    assert single(number_of_allocations=2,
                  adaptive_allocations={"enabled": True, "max_number_of_allocations": 4}) \
        == NA_ADAPTIVE


def test_number_of_allocations_zero_with_adaptive_enabled_gives_both():
    assert start_errors(number_of_allocations=0, adaptive_allocations={"enabled": True}) == \
        [NA_POSITIVE, NA_ADAPTIVE]


# ---- threads_per_allocation -------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 4, 8, 16, 32])
def test_threads_per_allocation_valid(t):
    assert validate_start(start(threads_per_allocation=t)).threads_per_allocation == t


def test_threads_per_allocation_zero_gives_both_messages():
    e = errors_of(validate_start, start(threads_per_allocation=0))
    assert e.messages == [TPA_POSITIVE, TPA_POW2]
    assert e.reason == f"Validation Failed: 1: {TPA_POSITIVE};2: {TPA_POW2};"


@pytest.mark.parametrize("t", [-1, -2, -4])
def test_threads_per_allocation_negative_gives_both_messages(t):
    assert start_errors(threads_per_allocation=t) == [TPA_POSITIVE, TPA_POW2]


@pytest.mark.parametrize("t", [3, 5, 6, 12, 31, 33, 64, 128])
def test_threads_per_allocation_not_power_of_two_or_too_big(t):
    assert single(threads_per_allocation=t) == TPA_POW2


# ---- queue_capacity ---------------------------------------------------------------------------

@pytest.mark.parametrize("q", [0, -1])
def test_queue_capacity_positive(q):
    assert single(queue_capacity=q) == QC_POSITIVE


@pytest.mark.parametrize("q", [1_000_001, 10_000_000])
def test_queue_capacity_max(q):
    assert single(queue_capacity=q) == QC_MAX


@pytest.mark.parametrize("q", [1, 1024, 1_000_000])
def test_queue_capacity_valid(q):
    assert validate_start(start(queue_capacity=q)).queue_capacity == q


# ---- timeout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,seconds", [("500ms", 0.5), ("30s", 30.0), ("1m", 60.0),
                                           ("2h", 7200.0), ("1d", 86400.0)])
def test_timeout_parsing(value, seconds):
    assert validate_start(start(timeout=value)).timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["0s", "0ms", "-1s", "-5m"])
def test_timeout_must_be_positive(value):
    assert single(timeout=value) == TIMEOUT_POSITIVE


@pytest.mark.parametrize("value", ["abc", "10", "10 parsecs", "", "s"])
def test_timeout_unparseable(value):
    msg = single(timeout=value)
    assert msg.startswith(f"failed to parse setting [timeout] with value [{value}]")


# ---- priority ---------------------------------------------------------------------------------

def test_low_priority_defaults_ok():
    p = validate_start(start(priority="low"))
    assert p.priority == "low"
    assert p.number_of_allocations == 1
    assert p.threads_per_allocation == 1


def test_low_priority_explicit_one_allocation_ok():
    assert validate_start(start(priority="low", number_of_allocations=1)).priority == "low"


def test_low_priority_more_allocations():
    assert single(priority="low", number_of_allocations=2) == NA_LOW


def test_low_priority_more_threads():
    assert single(priority="low", threads_per_allocation=2) == TPA_LOW


def test_low_priority_both():
    assert start_errors(priority="low", number_of_allocations=4, threads_per_allocation=4) == \
        [NA_LOW, TPA_LOW]


def test_unknown_priority():
    msg = single(priority="urgent")
    assert "[priority]" in msg and "urgent" in msg


# ---- wait_for ---------------------------------------------------------------------------------

@pytest.mark.parametrize("w", ["starting", "started", "fully_allocated"])
def test_wait_for_valid(w):
    assert validate_start(start(wait_for=w)).wait_for == w


@pytest.mark.parametrize("w", ["done", "STARTED", "", "stopped"])
def test_wait_for_invalid(w):
    assert single(wait_for=w) == wait_for_msg(w)


def test_wait_for_reached_order():
    assert wait_for_reached("starting", "starting")
    assert wait_for_reached("starting", "fully_allocated")
    assert wait_for_reached("started", "started")
    assert not wait_for_reached("started", "starting")
    assert not wait_for_reached("fully_allocated", "started")
    assert wait_for_reached("fully_allocated", "fully_allocated")


# ---- cache_size -------------------------------------------------------------------------------

@pytest.mark.parametrize("value,normalized", [("0", "0"), ("0b", "0b"), ("10kb", "10kb"),
                                              ("512KB", "512kb"), ("100mb", "100mb"),
                                              ("1gb", "1gb"), (" 2 mb ", "2mb"), (1630, "1630b"),
                                              (0, "0b")])
def test_cache_size_normalized(value, normalized):
    assert validate_start(start(cache_size=value)).cache_size == normalized


@pytest.mark.parametrize("value", ["abc", "10 parsecs", "-1kb", "kb", -5])
def test_cache_size_invalid(value):
    msg = single(cache_size=value)
    assert msg.startswith(f"failed to parse setting [cache_size] with value [{value}]")


# ---- adaptive allocations ---------------------------------------------------------------------

def test_adaptive_min_minus_one_is_400():
    assert single(adaptive_allocations={"enabled": True, "min_number_of_allocations": -1}) \
        == MIN_BAD


def test_adaptive_max_zero_is_400():
    assert single(adaptive_allocations={"enabled": True, "max_number_of_allocations": 0}) \
        == MAX_BAD


def test_adaptive_min_zero_is_valid():
    p = validate_start(start(adaptive_allocations={"enabled": True,
                                                   "min_number_of_allocations": 0,
                                                   "max_number_of_allocations": 1}))
    assert p.adaptive == Adaptive(True, 0, 1)


def test_adaptive_min_greater_than_max():
    assert single(adaptive_allocations={"enabled": True, "min_number_of_allocations": 5,
                                        "max_number_of_allocations": 2}) == MIN_GT_MAX


def test_adaptive_min_equal_max_is_valid():
    p = validate_start(start(adaptive_allocations={"enabled": True,
                                                   "min_number_of_allocations": 3,
                                                   "max_number_of_allocations": 3}))
    assert p.number_of_allocations == 3


def test_adaptive_min_and_max_both_bad():
    assert start_errors(adaptive_allocations={"enabled": True, "min_number_of_allocations": -1,
                                              "max_number_of_allocations": 0}) == \
        [MIN_BAD, MAX_BAD]


@pytest.mark.parametrize("lo", ["1", 1.5, True])
def test_adaptive_min_wrong_type(lo):
    assert single(adaptive_allocations={"enabled": True, "min_number_of_allocations": lo}) \
        == MIN_BAD


@pytest.mark.parametrize("hi", ["4", 2.0, True])
def test_adaptive_max_wrong_type(hi):
    assert single(adaptive_allocations={"enabled": True, "max_number_of_allocations": hi}) \
        == MAX_BAD


def test_adaptive_unknown_field():
    msg = single(adaptive_allocations={"enabled": True, "bogus": 1})
    assert "bogus" in msg and "[adaptive_allocations]" in msg


def test_adaptive_enabled_not_bool():
    msg = single(adaptive_allocations={"enabled": "yes"})
    assert "[enabled]" in msg


def test_adaptive_not_an_object():
    assert "[adaptive_allocations]" in single(adaptive_allocations=[1, 2])  # type: ignore[arg-type]


# ---- ids --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["UPPER", "-start", "end-", "has space", "a" * 65, "sl/ash"])
def test_invalid_deployment_id(bad):
    msg = single(deployment_id=bad)
    assert "[deployment_id]" in msg


def test_invalid_model_id():
    assert "[model_id]" in single(model_id="Bad Model")


@pytest.mark.parametrize("good", ["a", "my-model", "m.v1_2", "a" * 64, "0"])
def test_valid_ids(good):
    assert validate_start(start(deployment_id=good)).deployment_id == good


# ---- many broken rules at once ----------------------------------------------------------------

def test_many_rules_at_once_all_reported_in_order():
    e = errors_of(validate_start, start(number_of_allocations=0, threads_per_allocation=3,
                                        queue_capacity=0, timeout="0s", wait_for="nope"))
    assert e.messages == [NA_POSITIVE, TPA_POW2, QC_POSITIVE, TIMEOUT_POSITIVE, wait_for_msg("nope")]
    assert e.reason == ("Validation Failed: 1: " + NA_POSITIVE + ";2: " + TPA_POW2 + ";3: "
                        + QC_POSITIVE + ";4: " + TIMEOUT_POSITIVE + ";5: " + wait_for_msg("nope")
                        + ";")


def test_every_message_at_once_contains_each_phrase():
    msgs = start_errors(number_of_allocations=0, threads_per_allocation=0, queue_capacity=2_000_000,
                        timeout="-1s", priority="low", wait_for="x",
                        adaptive_allocations={"enabled": True, "min_number_of_allocations": -1,
                                              "max_number_of_allocations": 0})
    for m in (NA_POSITIVE, NA_ADAPTIVE, TPA_POSITIVE, TPA_POW2, QC_MAX, TIMEOUT_POSITIVE, NA_LOW,
              MIN_BAD, MAX_BAD, wait_for_msg("x")):
        assert m in msgs, m
    assert len(msgs) == len(set(msgs))


def test_validation_error_reason_format():
    e = ValidationError(["a", "b"])
    assert e.reason == "Validation Failed: 1: a;2: b;"
    assert e.status == 400 and e.type == "action_request_validation_exception"


# ---- update -----------------------------------------------------------------------------------

def update_errors(n, raw, current) -> list[str]:
    return errors_of(validate_update, n, raw, current).messages


def test_update_nothing():
    assert validate_update(None, None, None) == (None, None)
    cur = Adaptive(True, 1, 4)
    assert validate_update(None, None, cur) == (None, cur)


def test_update_number_of_allocations():
    assert validate_update(3, None, None) == (3, None)
    assert validate_update(3, None, Adaptive(False, 1, 4)) == (3, Adaptive(False, 1, 4))


@pytest.mark.parametrize("n", [0, -1])
def test_update_number_of_allocations_positive(n):
    assert update_errors(n, None, None) == [NA_POSITIVE]


def test_update_number_of_allocations_with_current_adaptive_enabled():
    assert update_errors(2, None, Adaptive(True, 1, 4)) == [NA_ADAPTIVE]


def test_update_number_of_allocations_and_enable_adaptive():
    assert update_errors(2, {"enabled": True}, None) == [NA_ADAPTIVE]


def test_update_number_of_allocations_while_disabling_adaptive():
    n, merged = validate_update(2, {"enabled": False}, Adaptive(True, 1, 4))
    assert n == 2
    assert merged == Adaptive(False, 1, 4)


def test_update_merges_max_only():
    assert validate_update(None, {"max_number_of_allocations": 8}, Adaptive(True, 1, 4)) == \
        (None, Adaptive(True, 1, 8))


def test_update_merges_min_only():
    assert validate_update(None, {"min_number_of_allocations": 0}, Adaptive(True, 2, 4)) == \
        (None, Adaptive(True, 0, 4))


def test_update_merges_enabled_only():
    assert validate_update(None, {"enabled": False}, Adaptive(True, 2, 4)) == \
        (None, Adaptive(False, 2, 4))


def test_update_explicit_null_clears_field():
    assert validate_update(None, {"max_number_of_allocations": None}, Adaptive(True, 2, 4)) == \
        (None, Adaptive(True, 2, None))


def test_update_without_current_uses_defaults():
    assert validate_update(None, {"enabled": True, "max_number_of_allocations": 3}, None) == \
        (None, Adaptive(True, None, 3))


def test_update_min_above_current_max():
    assert update_errors(None, {"min_number_of_allocations": 5}, Adaptive(True, 1, 4)) == \
        [MIN_GT_MAX]


def test_update_max_below_current_min():
    assert update_errors(None, {"max_number_of_allocations": 1}, Adaptive(True, 2, 4)) == \
        [MIN_GT_MAX]


def test_update_min_gt_max_in_one_request_reported_once():
    assert update_errors(None, {"min_number_of_allocations": 5, "max_number_of_allocations": 2},
                         Adaptive(True, 1, 10)) == [MIN_GT_MAX]


def test_update_min_minus_one():
    assert update_errors(None, {"min_number_of_allocations": -1}, Adaptive(True, 1, 4)) == \
        [MIN_BAD]


def test_update_max_zero():
    assert update_errors(None, {"max_number_of_allocations": 0}, Adaptive(True, 0, 4)) == \
        [MAX_BAD]


def test_update_several_problems_at_once():
    msgs = update_errors(0, {"min_number_of_allocations": -1, "max_number_of_allocations": 0},
                         Adaptive(True, 1, 4))
    assert NA_POSITIVE in msgs and MIN_BAD in msgs and MAX_BAD in msgs
    assert NA_ADAPTIVE in msgs


def test_update_does_not_mutate_current():
    cur = Adaptive(True, 1, 4)
    validate_update(None, {"max_number_of_allocations": 8}, cur)
    assert cur == Adaptive(True, 1, 4)


def test_wire_body_decoded_then_validated():
    from mlfleet.common.messages import decode
    from mlfleet.common.protocol import pack, unpack
    body = unpack(pack({"model_id": "m", "threads_per_allocation": 0, "queue_capacity": 0,
                        "timeout": "0s"}))
    msg = decode(StartDeployment, body, op="start_deployment")
    assert errors_of(validate_start, msg).messages == [TPA_POSITIVE, TPA_POW2, QC_POSITIVE,
                                                       TIMEOUT_POSITIVE]


# ---- bounds beyond Elasticsearch's rules: finiteness and caps -------------------------------------

NAN, INF = float("nan"), float("inf")


def time_parse_msg(name: str, value) -> str:
    return f"failed to parse setting [{name}] with value [{value}] as a time value"


@pytest.mark.parametrize("value", [NAN, INF, -INF, "9" * 400 + "s"])
def test_non_finite_timeout(value):
    assert single(timeout=value).startswith(time_parse_msg("timeout", str(value)[:80]))


@pytest.mark.parametrize("value", [NAN, INF, -INF, "9" * 400 + "ms"])
def test_non_finite_max_batch_delay(value):
    # seen on main: NaN passed both range checks and the coordinator died converting it to an int
    assert single(max_batch_delay=value).startswith(time_parse_msg("max_batch_delay", str(value)[:80]))


@pytest.mark.parametrize("value", ["8d", "169h", 7 * 86400 + 1, 1e300, "99999999999d"])
def test_timeout_capped_at_seven_days(value):
    assert single(timeout=value) == "[timeout] must be less than or equal to 7d"


@pytest.mark.parametrize("value,seconds",
                         [("7d", 7 * 86400.0), ("168h", 7 * 86400.0), (7 * 86400, 7 * 86400.0)])
def test_timeout_cap_itself_is_valid(value, seconds):
    assert validate_start(start(timeout=value)).timeout_s == seconds


@pytest.mark.parametrize("value", ["1001ms", 1.5, "2s", 1e300])
def test_max_batch_delay_cap(value):
    assert single(max_batch_delay=value) == "[max_batch_delay] must be less than or equal to 1s"


@pytest.mark.parametrize("value,ms", [("1s", 1000.0), (1, 1000.0), ("0ms", 0.0), (0.25, 250.0)])
def test_max_batch_delay_valid(value, ms):
    assert validate_start(start(max_batch_delay=value)).max_batch_delay_ms == ms


def test_max_batch_delay_negative():
    assert single(max_batch_delay="-1ms") == "[max_batch_delay] must not be negative"


@pytest.mark.parametrize("value", ["2pb", "1025tb", (1 << 50) + 1, 2**64 - 1, "99999999pb"])
def test_cache_size_capped_at_one_pb(value):
    assert single(cache_size=value) == "[cache_size] must be less than or equal to 1pb"


@pytest.mark.parametrize("value", ["1pb", "1024tb", 1 << 50])
def test_cache_size_cap_itself_is_valid(value):
    assert validate_start(start(cache_size=value)).cache_size is not None


def test_cache_size_too_many_digits_is_a_parse_error_not_a_crash():
    value = "9" * 400 + "pb"  # float() of the digits is inf: int(inf) would raise OverflowError
    assert single(cache_size=value) == (f"failed to parse setting [cache_size] with value [{value[:80]}] "
                                        "as a size in bytes")


NA_MAX = "[number_of_allocations] must be less than or equal to 100000"


@pytest.mark.parametrize("n", [100_001, 2**31, 2**63, 2**64 - 1])
def test_number_of_allocations_capped(n):
    assert single(number_of_allocations=n) == NA_MAX
    assert update_errors(n, None, None) == [NA_MAX]


def test_number_of_allocations_cap_itself_is_valid():
    assert validate_start(start(number_of_allocations=100_000)).number_of_allocations == 100_000
    assert validate_update(100_000, None, None) == (100_000, None)


@pytest.mark.parametrize("key", ["min_number_of_allocations", "max_number_of_allocations"])
def test_adaptive_bounds_capped(key):
    msg = f"[{key}] must be less than or equal to 100000"
    assert single(adaptive_allocations={"enabled": True, key: 100_001}) == msg
    assert update_errors(None, {key: 2**63}, Adaptive(True, 0, 4)) == [msg]


@pytest.mark.parametrize("lo", [NAN, INF, 1e300])
def test_adaptive_non_finite_or_float_bounds(lo):
    assert single(adaptive_allocations={"enabled": True, "min_number_of_allocations": lo}) == MIN_BAD


def test_number_of_allocations_wrong_type_from_code_is_a_validation_error():
    # the wire decoder rejects these types first; a caller in code gets the Elasticsearch message
    assert update_errors(1.5, None, None) == [NA_POSITIVE]
    assert update_errors(True, None, None) == [NA_POSITIVE]


def test_caps_reported_with_the_other_rules():
    msgs = start_errors(number_of_allocations=10**6, threads_per_allocation=3, timeout="30d",
                        cache_size="4pb", max_batch_delay=NAN)
    assert msgs == [NA_MAX, TPA_POW2, "[timeout] must be less than or equal to 7d",
                    time_parse_msg("max_batch_delay", "nan"),
                    "[cache_size] must be less than or equal to 1pb"]


def test_id_problem_is_the_message_layer_rule():
    from mlfleet.common import messages, params
    assert params.id_problem is messages.id_problem
    assert params.id_problem("model_id", "ok-id") is None

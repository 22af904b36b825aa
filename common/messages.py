"""One typed class per message. ``decode(cls, body)`` checks every field once, at the edge, before
any handler runs; handlers behind it trust what they get.

Two layers of checks, both here and both declarative:

* **types**: each field's annotation. A key of the wrong type is a 400 naming the field
  (``[name] must be an integer, got [...]``), the first one found;
* **values**: each field's :class:`Rule` (``rule(...)`` in the class body) plus the rules every
  value obeys whatever its field: every float is finite (NaN and infinities are rejected, also
  inside lists and maps), strings, bytes, lists and maps are bounded, untyped content (inference
  documents, ``model_config``) is bounded in depth and size. Rules name ranges (``min``/``max``),
  lengths, a charset (``pattern``), allowed values (``choices``) and, for maps, a **shape**: the
  keys allowed, which are required, and each key's type and rule. Every broken value rule of a
  message is reported at once, as Elasticsearch does: ``Validation Failed: 1: [name] must be
  ...;2: ...;`` (400, ``action_request_validation_exception``).

The Elasticsearch rules of start and update (``common.params``) run in the handler, after these;
their fields carry only the bounds params does not own here (ids, lengths, finiteness).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from mlfleet.common.errors import BadRequest, ValidationError
from mlfleet.common.protocol import MAX_PAYLOAD_FRAMES

T = TypeVar("T")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
               bytes: "bytes", dict: "a map", list: "a list"}

# ---- limits: the bounds of values on the wire (the frame size bounds the rest) ------------------

MAX_FRAME_BYTES = 64 * 1024 * 1024    # as common.protocol.MAX_MESSAGE_BYTES (no import: no cycle)
MAX_STRING = 4096                      # any string without a rule of its own
MAX_LIST = 10_000                      # any list without a rule of its own
MAX_MAP = 1_000                        # any map without a shape of its own
MAX_PROCESSORS = 4096                  # allocated processors, cpu counts
MAX_NUMBER_OF_ALLOCATIONS = 100_000    # a deployment's allocations, on one node or in all
MAX_MEMORY_BYTES = 1 << 50             # 1pb: memory, model and cache sizes, file offsets
MAX_PID = 1 << 22                      # Linux's pid_max ceiling
MAX_EPOCH_MS = 253_402_300_799_999     # epoch milliseconds: 9999-12-31T23:59:59.999Z, the last
                                      # instant ISO-8601 (and get_stats' start_time) can write
MAX_COUNTER = (1 << 63) - 1            # monotonic counters in route reports
MAX_TIMEOUT_MS = 3_600_000             # an inference or await_routes may wait at most 1 hour
MAX_DOCS = 10_000                      # documents in one infer
MAX_REASON = 4096                      # a route report's reason (agents cut theirs at ~1000)
MAX_REPORTS = 4096                     # route reports in one register/heartbeat
MAX_CHUNK_REQUEST = 8 << 20            # model_chunk.length

# ---- ids ----------------------------------------------------------------------------------------

ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_\-.]{0,62}[a-z0-9])?\Z")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}\Z")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{16,64}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
BULK_TOKEN_RE = re.compile(r"^[0-9a-f]{32}\Z")
HOSTNAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,255}\Z")
ADDRESS_RE = re.compile(r"^(?:tcp|ipc|inproc|ws|wss|udp|pgm|epgm|vmci)://[^\s\x00-\x1f\x7f]{1,500}\Z")


def id_problem(name: str, value: str) -> str | None:
    """Elasticsearch's rule for model and deployment ids."""
    if ID_RE.match(value):
        return None
    return (f"Invalid [{name}]; [{value[:80]}] can contain lowercase alphanumeric (a-z and 0-9), "
            "hyphens, periods or underscores; must start and end with alphanumeric and be at most "
            "64 characters")


def _id_or_all(name: str, value: str) -> str | None:
    return None if value in ("_all", "*") else id_problem(name, value)


# ---- rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Content:
    """Bounds on untyped content (``Any``, lists and maps without item rules or a shape)."""
    max_depth: int = 8
    max_items: int = 10_000
    max_string: int = MAX_STRING
    max_bytes: int = MAX_FRAME_BYTES
    json_only: bool = False  # str keys only, no bytes: what json.dumps can store


@dataclass(frozen=True)
class Rule:
    """The value rule of a field (or of a map entry, or of a list's elements).

    Each part applies to the values it makes sense for: ``min``/``max`` to numbers, ``max_len``
    to strings (characters), bytes, lists (elements) and maps (entries), ``pattern``/``problem``/
    ``choices`` to strings, ``items`` to list elements, ``shape`` to maps."""
    min: Optional[float] = None
    max: Optional[float] = None
    min_msg: Optional[str] = None                 # replaces "[name] must be greater than or equal to N"
    max_msg: Optional[str] = None
    max_len: Optional[int] = None
    pattern: Optional[re.Pattern[str]] = None     # full match
    pattern_msg: str = "[{name}] has an invalid format"
    problem: Optional[Callable[[str, str], Optional[str]]] = None  # (name, value) -> message or None
    choices: Optional[tuple[str, ...]] = None
    items: Optional[Spec] = None
    shape: Optional[Mapping[str, Spec]] = None
    required: tuple[str, ...] = ()                # keys a shaped map must have
    extra: Optional[Spec] = None                # a shaped map may have other keys, values like this
    content: Content = Content()


@dataclass(frozen=True)
class Spec:
    """A nested value's type and rule: a map entry of a shape, a list's elements. ``tp`` may be a
    message class: the value is then a map that must decode as that class (it stays a map)."""
    tp: Any
    rule: Rule = Rule()


def spec(tp: Any, **kw: Any) -> Spec:
    return Spec(tp, Rule(**kw))


def rule(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
         **kw: Any) -> Any:
    """A dataclass field with a value rule: ``x: int = rule(1, min=1, max=32)``."""
    return field(default=default, default_factory=default_factory, metadata={"rule": Rule(**kw)})


_NO_RULE = Rule()


# ---- type checks ------------------------------------------------------------------------------

def _check(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(name, value, a)
            except BadRequest as e:
                errors.append(e)
        raise errors[0]
    base = origin or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise BadRequest(f"[{name}] must be a finite number, got [{value!r:.80}]") from None
    if base is int and isinstance(value, bool):
        raise BadRequest(f"[{name}] must be {_TYPE_NAMES[int]}")
    if base is bytes and isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, base):
        raise BadRequest(f"[{name}] must be {_TYPE_NAMES.get(base, base.__name__)}, got [{value!r:.80}]")
    return value


# ---- value checks -----------------------------------------------------------------------------

def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_value(name: str, value: Any, r: Rule, errors: list[str]) -> None:
    """Append what is wrong with ``value`` (already of its field's type) under rule ``r``."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"[{name}] must be a finite number, got [{value}]")
        return
    if isinstance(value, (int, float)):
        if r.min is not None and value < r.min:
            errors.append(r.min_msg or f"[{name}] must be greater than or equal to {_num(r.min)}")
        elif r.max is not None and value > r.max:
            errors.append(r.max_msg or f"[{name}] must be less than or equal to {_num(r.max)}")
        return
    if isinstance(value, str):
        limit = r.max_len if r.max_len is not None else MAX_STRING
        if len(value) > limit:
            errors.append(f"[{name}] must be at most {limit} characters long")
        elif r.choices is not None and value not in r.choices:
            errors.append(f"invalid [{name}] [{value[:80]}]; must be one of [{','.join(r.choices)}]")
        elif r.pattern is not None and not r.pattern.match(value):
            errors.append(r.pattern_msg.format(name=name, value=value[:80]))
        elif r.problem is not None and (p := r.problem(name, value)):
            errors.append(p)
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        limit = r.max_len if r.max_len is not None else MAX_FRAME_BYTES
        if r.content.json_only:
            errors.append(f"[{name}] must not be bytes")
        elif len(value) > limit:
            errors.append(f"[{name}] must be at most {limit} bytes long")
        return
    if isinstance(value, list):
        limit = r.max_len if r.max_len is not None else MAX_LIST
        if len(value) > limit:
            errors.append(f"[{name}] must have at most {limit} elements")
            return
        if r.items is not None:
            for i, item in enumerate(value):
                _check_spec(f"{name}[{i}]", item, r.items, errors)
                if len(errors) >= 20:
                    return
        else:
            _check_content(name, value, r.content, errors)
        return
    if isinstance(value, dict):
        if r.shape is not None:
            _check_shape(name, value, r, errors)
            return
        limit = r.max_len if r.max_len is not None else MAX_MAP
        if len(value) > limit:
            errors.append(f"[{name}] must have at most {limit} entries")
            return
        _check_content(name, value, r.content, errors)
        return
    _check_content(name, value, r.content, errors)


def _check_spec(name: str, value: Any, s: Spec, errors: list[str]) -> None:
    if dataclasses.is_dataclass(s.tp):
        if not isinstance(value, dict):
            errors.append(f"[{name}] must be a map, got [{value!r:.80}]")
            return
        _check_message(s.tp, value, errors, prefix=f"{name}.")
        return
    try:
        value = _check(name, value, s.tp)
    except BadRequest as e:
        errors.append(e.reason)
        return
    _check_value(name, value, s.rule, errors)


def _check_shape(name: str, value: dict, r: Rule, errors: list[str]) -> None:
    shape = r.shape or {}
    if r.extra is None:
        unknown = sorted(str(k) for k in value if k not in shape)
        if unknown:
            errors.append(f"[{name}] does not support [{', '.join(u[:80] for u in unknown[:10])}]")
            return
    elif len(value) > (r.max_len if r.max_len is not None else MAX_MAP):
        errors.append(f"[{name}] must have at most {r.max_len or MAX_MAP} entries")
        return
    for key in r.required:
        if key not in value:
            errors.append(f"[{name}.{key}] is required")
    if r.extra is not None:  # the whole map, known keys included, within the content bounds
        before = len(errors)
        _check_content(name, value, r.content, errors)
        if len(errors) > before:
            return
    for key, v in value.items():
        s = shape.get(key) if isinstance(key, str) else None
        if s is None:
            if not isinstance(key, str):
                errors.append(f"[{name}] keys must be strings, got [{key!r:.80}]")
                continue
            if len(key) > MAX_STRING:
                errors.append(f"[{name}] keys must be at most {MAX_STRING} characters long")
                continue
            s = r.extra  # not None: unknown keys were reported above
        _check_spec(f"{name}.{key}", v, s, errors)


def _content_ok(value: Any, c: Content) -> bool:
    """The fast pass of ``_check_content`` (the inference hot path): True when nothing is wrong.
    Level by level, exact types only; anything unusual is left to the slow pass."""
    level = [value]
    depth = seen = 0
    isfinite = math.isfinite
    while level:
        seen += len(level)
        if seen > c.max_items:
            return False
        nxt: list[Any] = []
        for v in level:
            t = type(v)
            if t is int or t is bool or v is None:
                continue
            if t is str:
                if len(v) > c.max_string:
                    return False
            elif t is float:
                if not isfinite(v):
                    return False
            elif t is bytes or t is memoryview:  # memoryview: an array's bytes, a view of its frame
                if c.json_only or len(v) > c.max_bytes:
                    return False
            elif t is dict:
                if depth >= c.max_depth:
                    return False
                for k in v:
                    if type(k) is not str or len(k) > c.max_string:
                        return False
                nxt.extend(v.values())
            elif t is list:
                if depth >= c.max_depth:
                    return False
                nxt.extend(v)
            else:
                return False
        level = nxt
        depth += 1
    return True


def _check_content(name: str, value: Any, c: Content, errors: list[str]) -> None:
    """Untyped content: finite floats, bounded strings/bytes, depth and size; iterative (a deep
    structure cannot exhaust the interpreter's stack)."""
    if _content_ok(value, c):
        return
    # entries: (value, depth, path) where path is (parent path, key) built as we go
    stack: list[tuple[Any, int, Any]] = [(value, 0, None)]
    seen = 0

    def where(path: Any) -> str:
        keys = []
        while path is not None:
            path, key = path
            keys.append(key)
        out = name
        for k in reversed(keys):
            out += f"[{k}]" if isinstance(k, int) else f".{k}"
        return out

    while stack:
        v, depth, path = stack.pop()
        seen += 1
        if seen > c.max_items:
            errors.append(f"[{name}] must have at most {c.max_items} values in all")
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                errors.append(f"[{where(path)}] must be a finite number, got [{v}]")
                return
        elif isinstance(v, str):
            if len(v) > c.max_string:
                errors.append(f"[{where(path)}] must be at most {c.max_string} characters long")
                return
        elif isinstance(v, (bytes, bytearray, memoryview)):
            if c.json_only:
                errors.append(f"[{where(path)}] must not be bytes")
                return
            if len(v) > c.max_bytes:
                errors.append(f"[{where(path)}] must be at most {c.max_bytes} bytes long")
                return
        elif isinstance(v, (list, tuple, dict)):
            if depth >= c.max_depth:
                errors.append(f"[{where(path)}] is nested too deeply (at most {c.max_depth} levels)")
                return
            if isinstance(v, dict):
                for k, item in v.items():
                    if c.json_only and not isinstance(k, str):
                        errors.append(f"[{where(path)}] keys must be strings, got [{k!r:.80}]")
                        return
                    if isinstance(k, float) and not math.isfinite(k):
                        errors.append(f"[{where(path)}] keys must be finite numbers, got [{k}]")
                        return
                    if isinstance(k, (str, bytes)) and len(k) > c.max_string:
                        errors.append(f"[{where(path)}] keys must be at most {c.max_string} characters long")
                        return
                    stack.append((item, depth + 1, (path, k)))
            else:
                for i, item in enumerate(v):
                    stack.append((item, depth + 1, (path, i)))
        elif not (v is None or isinstance(v, (bool, int))):
            errors.append(f"[{where(path)}] has a value of an unsupported type [{type(v).__name__}]")
            return


# ---- decode -----------------------------------------------------------------------------------

@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, bool], dict[str, Rule]]:
    """Field types, whether each is required, and each field's rule, computed once per class
    (get_type_hints is slow)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for f in fields}
    rules = {f.name: f.metadata.get("rule", _NO_RULE) for f in fields}
    return {name: hints[name] for name in required}, required, rules


def _check_message(cls: type, body: dict, errors: list[str], prefix: str = "") -> None:
    """A nested message (a map that decodes as ``cls``): every problem, types included, appended."""
    types_, required, rules = _schema(cls)
    unknown = sorted(str(k)[:80] for k in body if k not in types_)
    if unknown:
        errors.append(f"[{prefix.rstrip('.')}] does not support [{', '.join(unknown[:10])}]")
    for name, tp in types_.items():
        if name in body:
            _check_spec(prefix + name, body[name], Spec(tp, rules[name]), errors)
        elif required[name]:
            errors.append(f"[{prefix}{name}] is required")


def decode(cls: type[T], body: dict[str, Any], op: str | None = None) -> T:
    """``body`` -> ``cls``: unknown keys, required keys and types (400 naming the first problem),
    then every value rule (400 listing every broken rule)."""
    types_, required, rules = _schema(cls)
    for k in body:
        if k not in types_:
            unknown = sorted(str(k)[:80] for k in body if k not in types_)
            raise BadRequest(f"request [{(op or cls.__name__)[:64]}] does not support parameter "
                             f"[{', '.join(unknown[:10])}]")
    kwargs = {}
    for name, tp in types_.items():
        if name in body:
            kwargs[name] = _check(name, body[name], tp)
        elif required[name]:
            raise BadRequest(f"[{name}] is required")
    errors: list[str] = []
    for name, value in kwargs.items():
        _check_value(name, value, rules[name], errors)
    if errors:
        raise ValidationError(errors)
    return cls(**kwargs)


def encode(msg: Any) -> dict[str, Any]:
    return dataclasses.asdict(msg)


def validate(msg: Any) -> None:
    """The value rules of a message built in code (``decode`` does this for received ones)."""
    _, _, rules = _schema(type(msg))
    errors: list[str] = []
    for f in dataclasses.fields(msg):
        _check_value(f.name, getattr(msg, f.name), rules[f.name], errors)
    if errors:
        raise ValidationError(errors)


# ---- shared rule parts ------------------------------------------------------------------------

_ID = dict(problem=id_problem)
_ID_OR_ALL = dict(problem=_id_or_all)
_NODE_ID = dict(max_len=128, pattern=NODE_ID_RE,
                pattern_msg="Invalid [{name}]; [{value}] must be 1 to 128 characters: letters, digits, "
                            "hyphens, periods, colons or underscores, starting with a letter or digit")
_UPLOAD_ID = dict(pattern=UPLOAD_ID_RE, pattern_msg="[{name}] must be 16 to 64 lowercase hex characters")
_SHA256 = dict(pattern=SHA256_RE, pattern_msg="[{name}] must be 64 lowercase hex characters")
_TIME = dict(max_len=64)  # a time value ("30s") or a number of seconds; params owns its range
TASKS = ("pass_through", "text_embedding", "text_classification", "ner")
ROUTING_STATES = ("starting", "started", "stopping", "stopped", "failed")

_ALLOCATIONS = dict(min=0, max=MAX_NUMBER_OF_ALLOCATIONS)
MEMORY_SHAPE = {"total_bytes": spec(int, min=0, max=MAX_MEMORY_BYTES),
                "available_bytes": spec(int, min=0, max=MAX_MEMORY_BYTES)}
CPU_SHAPE = {"physical": spec(int, min=1, max=MAX_PROCESSORS),
             "logical": spec(int, min=1, max=MAX_PROCESSORS)}
_COUNT = spec(int, min=0, max=MAX_COUNTER)
_AVG = spec(float, min=0, max=1e15)
STATS_SHAPE = {
    "inference_count": _COUNT, "error_count": _COUNT, "timeout_count": _COUNT,
    "rejected_execution_count": _COUNT, "inference_cache_hit_count": _COUNT,
    "number_of_pending_requests": _COUNT, "throughput_last_minute": _COUNT,
    "peak_throughput_per_minute": _COUNT, "cache_bytes": spec(int, min=0, max=MAX_MEMORY_BYTES),
    "average_inference_time_ms": _AVG, "average_inference_time_ms_excluding_cache_hits": _AVG,
    "average_queue_time_ms": _AVG, "average_batch_size": _AVG,
    "start_time": spec(Optional[int], min=0, max=MAX_EPOCH_MS),
    "last_access": spec(Optional[int], min=0, max=MAX_EPOCH_MS),
}
# model_config is stored as given (echoed as inference_config); the keys the workers read are typed,
# other keys are kept as bounded JSON.
MODEL_CONFIG_SHAPE = {
    "pooling": spec(str, max_len=64),  # mean (also for an unknown value), cls or max
    "normalize": spec(bool),
    "max_sequence_length": spec(Optional[int], min=1, max=1 << 20),
    "embedding_size": spec(Optional[int], min=1, max=1 << 20),
    "source": spec(Optional[str], max_len=1000),
    # text_classification and ner (Elasticsearch's names); every text task: max_batch_tokens
    "classification_labels": spec(Optional[list], max_len=10_000, items=spec(str, max_len=256)),
    "num_top_classes": spec(Optional[int], min=-1, max=10_000),
    "results_field": spec(Optional[str], max_len=256),
    "max_batch_tokens": spec(Optional[int], min=1, max=1 << 24),
    # set by the upload from the file's contents (common.formats); a different value is a 400
    "format": spec(Optional[str], choices=("torchscript", "export", "aoti")),
    # pass_through warm-up input, in the wire's array encoding; stored as JSON (common.formats)
    "example_input": spec(Optional[dict], shape={
        "dtype": spec(str, max_len=32), "shape": spec(list, max_len=32, items=spec(int, min=0, max=1 << 40)),
        "data": spec(bytes, max_len=64 << 10)}, required=("dtype", "shape", "data")),
}
_JSON = Content(max_depth=8, max_items=1000, max_string=MAX_STRING, json_only=True)
# at upload, bytes only under example_input (common.formats.stored_config turns them into JSON):
# the other keys' values are JSON, the whole map within the same bounds
_MODEL_CONFIG = dict(shape=MODEL_CONFIG_SHAPE, max_len=64, extra=Spec(Any, Rule(content=_JSON)),
                     content=dataclasses.replace(_JSON, json_only=False))
# adaptive_allocations: the keys; their values' rules are Elasticsearch's (common.params), here only
# the bounds every value has
ADAPTIVE_SHAPE = {k: Spec(Any) for k in ("enabled", "min_number_of_allocations", "max_number_of_allocations")}


# ---- client -> coordinator ---------------------------------------------------------------

@dataclass(frozen=True)
class PutModelChunk:
    upload_id: str = rule(**_UPLOAD_ID)
    offset: int = rule(min=0, max=MAX_MEMORY_BYTES)
    data: bytes = rule(max_len=MAX_FRAME_BYTES)


@dataclass(frozen=True)
class PutModel:
    model_id: str = rule(**_ID)
    upload_id: str = rule(**_UPLOAD_ID)
    sha256: str = rule(**_SHA256)
    task: str = rule("pass_through", choices=TASKS)
    tokenizer: Optional[bytes] = rule(None, max_len=MAX_FRAME_BYTES)
    model_config: Optional[dict] = rule(None, **_MODEL_CONFIG)


@dataclass(frozen=True)
class GetModels:
    model_id: Optional[str] = rule(None, **_ID_OR_ALL)


@dataclass(frozen=True)
class DeleteModel:
    model_id: str = rule(**_ID)


@dataclass(frozen=True)
class StartDeployment:
    """Elasticsearch's rules for these values are ``common.params.validate_start``: they are
    reported together; the rules here are the ids and bounds on size and finiteness."""
    model_id: str = rule(**_ID)
    deployment_id: Optional[str] = rule(None, **_ID)
    number_of_allocations: Optional[int] = None
    threads_per_allocation: int = 1
    queue_capacity: int = 1024
    priority: str = rule("normal", max_len=64)
    cache_size: Optional[typing.Union[str, int]] = rule(None, max_len=64)
    timeout: typing.Union[str, int, float] = rule("30s", **_TIME)
    wait_for: str = rule("started", max_len=64)
    adaptive_allocations: Optional[dict] = rule(None, shape=ADAPTIVE_SHAPE)
    max_batch_size: int = 1
    max_batch_delay: typing.Union[str, int, float] = rule("0ms", **_TIME)


@dataclass(frozen=True)
class UpdateDeployment:
    deployment_id: str = rule(**_ID)
    number_of_allocations: Optional[int] = None
    adaptive_allocations: Optional[dict] = rule(None, shape=ADAPTIVE_SHAPE)


@dataclass(frozen=True)
class StopDeployment:
    deployment_id: str = rule(**_ID)
    force: bool = False
    allow_no_match: bool = True
    finish_pending_work: bool = False


@dataclass(frozen=True)
class DeploymentRef:
    """clear_cache, get_routing."""
    deployment_id: str = rule(**_ID)


@dataclass(frozen=True)
class AwaitRoutes:
    """Wait until the deployment has an allocation to route to (scale from zero)."""
    deployment_id: str = rule(**_ID)
    timeout_ms: int = rule(10_000, min=1, max=MAX_TIMEOUT_MS, min_msg="[timeout] must be positive")


@dataclass(frozen=True)
class GetStats:
    deployment_id: Optional[str] = rule(None, **_ID_OR_ALL)


@dataclass(frozen=True)
class Empty:
    pass


# ---- client -> agent (inference endpoint) ------------------------------------------------

DOCS_CONTENT = Content(max_depth=16, max_items=1_000_000, max_string=16 << 20)
INFERENCE_CONFIG_CONTENT = Content(max_depth=4, max_items=256, max_string=4096, json_only=True)


@dataclass(frozen=True)
class Infer:
    """The header of an inference request; its documents follow as a payload (Docs), which the
    agent relays undecoded and the worker decodes."""
    deployment_id: str = rule(**_ID)
    timeout_ms: int = rule(10_000, min=1, max=MAX_TIMEOUT_MS, min_msg="[timeout] must be positive")
    # Elasticsearch's infer-time overrides for the task (num_top_classes, results_field...): their
    # shape here, their meaning checked by the worker's task (a 400 naming the field)
    inference_config: Optional[dict] = rule(None, max_len=64, content=INFERENCE_CONFIG_CONTENT)


def decode_infer(body: dict[str, Any]) -> Infer:
    """``decode(Infer, body)`` on the hot path, as ``decode_run_jobs``."""
    if type(body) is dict and body.keys() <= {"deployment_id", "timeout_ms"}:
        dep, t = body.get("deployment_id"), body.get("timeout_ms", 10_000)
        if type(dep) is str and ID_RE.match(dep) and type(t) is int and 1 <= t <= MAX_TIMEOUT_MS:
            return Infer(deployment_id=dep, timeout_ms=t)
    return decode(Infer, body, "infer")


@dataclass(frozen=True)
class Docs:
    """An inference request's payload tree, as the worker decodes it."""
    docs: list = rule(max_len=MAX_DOCS, content=DOCS_CONTENT)


def decode_docs(tree: Any) -> list[Any]:
    """``decode(Docs, {"docs": tree}).docs`` on the worker's hot path, as ``decode_run_jobs``."""
    if type(tree) is list and len(tree) <= MAX_DOCS and _content_ok(tree, DOCS_CONTENT):
        return tree
    return decode(Docs, {"docs": tree}, "infer").docs


# ---- agent <-> allocation worker (ipc; see agent/worker.py) --------------------------------------

MAX_JOBS = 4096


@dataclass(frozen=True)
class WorkerJob:
    """One request in a RunJobs message: its id, how many payload frames follow for it, and
    the request's inference_config, if it had one."""
    rid: int = rule(min=0, max=MAX_COUNTER)
    frames: int = rule(min=1, max=MAX_PAYLOAD_FRAMES)
    inference_config: Optional[dict] = rule(None, max_len=64, content=INFERENCE_CONFIG_CONTENT)


@dataclass(frozen=True)
class RunJobs:
    """agent -> worker (op ``infer``): the jobs' payloads follow the header, in order."""
    jobs: list = rule(max_len=MAX_JOBS, items=Spec(WorkerJob))


@dataclass(frozen=True)
class JobResult:
    """One job's outcome: 200 with ``docs`` results in ``frames`` payload frames, or an error."""
    rid: int = rule(min=0, max=MAX_COUNTER)
    status: int = rule(min=200, max=599)
    docs: int = rule(0, min=0, max=MAX_DOCS)
    frames: int = rule(0, min=0, max=MAX_PAYLOAD_FRAMES)
    reason: str = rule("", max_len=MAX_REASON)


@dataclass(frozen=True)
class Results:
    """worker -> agent (op ``results``): the jobs' result payloads follow the header, in order."""
    time_ms: float = rule(min=0, max=1e12)
    items: list = rule(max_len=MAX_JOBS, items=Spec(JobResult))


def _small_ints_ok(d: dict[str, Any], bounds: dict[str, tuple[int, int]], required: tuple[str, ...],
                   extra: Callable[[str, Any], bool] = lambda k, v: False) -> bool:
    """The common case of a map of bounded ints, checked fast: True only if ``decode`` would take
    it as it is (it is then still the type's rules that hold, ``decode`` just says why not)."""
    if type(d) is not dict:
        return False
    for k, v in d.items():
        b = bounds.get(k)
        if b is None:
            if not extra(k, v):
                return False
        elif type(v) is not int or not b[0] <= v <= b[1]:
            return False
    return all(k in d for k in required)


_JOB = {"rid": (0, MAX_COUNTER), "frames": (1, MAX_PAYLOAD_FRAMES)}
_RESULT = {"rid": (0, MAX_COUNTER), "status": (200, 599), "docs": (0, MAX_DOCS),
           "frames": (0, MAX_PAYLOAD_FRAMES)}


def _reason_ok(k: str, v: Any) -> bool:
    return k == "reason" and type(v) is str and len(v) <= MAX_REASON


def decode_run_jobs(body: dict[str, Any]) -> RunJobs:
    """``decode(RunJobs, body)`` on the hot path: the common case checked in a few microseconds,
    anything else through ``decode`` (tests/test_codec.py checks the two agree)."""
    jobs = body.get("jobs") if type(body) is dict and body.keys() <= {"jobs"} else None
    if type(jobs) is list and len(jobs) <= MAX_JOBS and all(
            _small_ints_ok(j, _JOB, ("rid", "frames")) for j in jobs):
        return RunJobs(jobs=jobs)
    return decode(RunJobs, body, "infer")


def decode_results(body: dict[str, Any]) -> Results:
    """``decode(Results, body)`` on the hot path, as ``decode_run_jobs``."""
    if type(body) is dict and body.keys() <= {"time_ms", "items"}:
        t, items = body.get("time_ms"), body.get("items")
        if (type(t) in (int, float) and 0 <= t <= 1e12 and type(items) is list  # NaN fails the range
                and len(items) <= MAX_JOBS
                and all(_small_ints_ok(i, _RESULT, ("rid", "status"), _reason_ok) for i in items)):
            return Results(time_ms=float(t), items=items)
    return decode(Results, body, "results")


@dataclass(frozen=True)
class WorkerReady:
    """worker -> agent (op ``ready``): connected (and warmed up); send it work."""
    pid: int = rule(min=1, max=1 << 22)


# ---- agent <-> model host (its stdin/stdout; see agent/host.py) ---------------------------------

_WORKER_ID = dict(max_len=64, pattern=re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z"),
                  pattern_msg="[{name}] must be 1 to 64 letters, digits, '_', '-' or '.'")


@dataclass(frozen=True)
class Spawn:
    """agent -> host: fork a worker that connects with this identity."""
    worker_id: str = rule(**_WORKER_ID)
    identity: str = rule(max_len=512)


@dataclass(frozen=True)
class KillWorker:
    """agent -> host: SIGTERM the worker (SIGKILL with ``force``)."""
    worker_id: str = rule(**_WORKER_ID)
    force: bool = rule(False)


@dataclass(frozen=True)
class HostLoaded:
    """host -> agent: the model is loaded; workers may be spawned."""
    pid: int = rule(min=1, max=1 << 22)


@dataclass(frozen=True)
class HostFailed:
    reason: str = rule(max_len=MAX_REASON)


@dataclass(frozen=True)
class WorkerSpawned:
    worker_id: str = rule(**_WORKER_ID)
    pid: int = rule(min=1, max=1 << 22)


@dataclass(frozen=True)
class WorkerExited:
    worker_id: str = rule(**_WORKER_ID)
    pid: int = rule(0, min=0, max=1 << 22)
    code: Optional[int] = rule(None, min=-255, max=255)


# ---- agent -> coordinator ----------------------------------------------------------------

@dataclass(frozen=True)
class RouteReport:
    """One deployment as an agent runs it; part of register/heartbeat."""
    deployment_id: str = rule(**_ID)
    routing_state: str = rule(choices=ROUTING_STATES)
    current_allocations: int = rule(**_ALLOCATIONS)
    target_allocations: int = rule(**_ALLOCATIONS)
    reason: str = rule("", max_len=MAX_REASON)
    stats: dict = rule(default_factory=dict, shape=STATS_SHAPE)


_REPORTS = dict(max_len=MAX_REPORTS, items=Spec(RouteReport))


@dataclass(frozen=True)
class Register:
    node_id: str = rule(**_NODE_ID)
    hostname: str = rule(max_len=255, pattern=HOSTNAME_RE,
                         pattern_msg="[{name}] must be 1 to 255 characters without control characters")
    transport_address: str = rule(max_len=512, pattern=ADDRESS_RE,
                                  pattern_msg="[{name}] must be an endpoint such as tcp://host:port, "
                                              "got [{value}]")
    allocated_processors: int = rule(min=1, max=MAX_PROCESSORS)
    cpu: dict = rule(shape=CPU_SHAPE, required=tuple(CPU_SHAPE))
    memory: dict = rule(shape=MEMORY_SHAPE, required=tuple(MEMORY_SHAPE))
    pid: int = rule(min=1, max=MAX_PID)
    deployments: list = rule(default_factory=list, **_REPORTS)


@dataclass(frozen=True)
class Heartbeat:
    node_id: str = rule(**_NODE_ID)
    memory: dict = rule(shape=MEMORY_SHAPE, required=tuple(MEMORY_SHAPE))
    deployments: list = rule(default_factory=list, **_REPORTS)


@dataclass(frozen=True)
class ModelChunk:
    """Model bytes. From the registered connection without ``node_id`` and ``bulk_token``; from
    the agent's bulk connection with both: the node and the token its registration was given."""
    sha256: str = rule(**_SHA256)
    offset: int = rule(min=0, max=MAX_MEMORY_BYTES)
    length: int = rule(min=1, max=MAX_CHUNK_REQUEST)
    node_id: Optional[str] = rule(None, **_NODE_ID)
    bulk_token: Optional[str] = rule(None, pattern=BULK_TOKEN_RE,
                                     pattern_msg="[{name}] must be 32 lowercase hex characters")


# ---- coordinator -> agent ------------------------------------------------------------------

@dataclass(frozen=True)
class NodeAssignment:
    """coordinator -> agent: one deployment the node must run (part of ``sync``)."""
    deployment_id: str = rule(**_ID)
    model_id: str = rule(**_ID)
    sha256: str = rule(**_SHA256)
    model_bytes: int = rule(min=0, max=MAX_MEMORY_BYTES)
    task: str = rule(choices=TASKS)
    threads_per_allocation: int = rule(min=1, max=32)
    target_allocations: int = rule(**_ALLOCATIONS)
    queue_capacity: int = rule(min=1, max=1_000_000)
    cache_size_bytes: int = rule(min=0, max=MAX_MEMORY_BYTES)
    priority: str = rule(choices=("normal", "low"))
    stopping: bool = False
    finish_pending_work: bool = False
    routing_version: int = rule(0, min=0, max=(1 << 63) - 1)
    tokenizer_sha256: Optional[str] = rule(None, **_SHA256)
    # as stored (models put before put_model checked its shape included): bounded JSON
    model_config: Optional[dict] = rule(None, max_len=64, content=_JSON)
    max_batch_size: int = rule(1, min=1, max=1024)
    max_batch_delay_ms: float = rule(0.0, min=0.0, max=1000.0)


# ---- node lifecycle and keys -----------------------------------------------------------------

Z85_KEY_RE = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")


@dataclass(frozen=True)
class Leave:
    """agent -> coordinator: the agent is shutting down cleanly; route elsewhere now."""
    node_id: str = rule(**_NODE_ID)


@dataclass(frozen=True)
class RotateNodeKey:
    """admin: the node id's next registration must come with this agent key."""
    node_id: str = rule(**_NODE_ID)
    public_key: str = rule(pattern=Z85_KEY_RE, pattern_msg="[{name}] must be a 40-character Z85 public key")

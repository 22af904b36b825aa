"""One typed class per message. ``decode(cls, body)`` checks every field's type once, at the edge;
handlers behind it trust the types. Value rules (Elasticsearch's validation messages) live in
``common.params``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from mlfleet.common.errors import BadRequest

T = TypeVar("T")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
               bytes: "bytes", dict: "a map", list: "a list"}


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
        return float(value)
    if base is int and isinstance(value, bool):
        raise BadRequest(f"[{name}] must be {_TYPE_NAMES[int]}")
    if base is bytes and isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, base):
        raise BadRequest(f"[{name}] must be {_TYPE_NAMES.get(base, base.__name__)}, got [{value!r:.80}]")
    return value


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, bool]]:
    """Field types and whether each is required, computed once per class (get_type_hints is slow)."""
    hints = typing.get_type_hints(cls)
    required = {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                for f in dataclasses.fields(cls)}
    return {name: hints[name] for name in required}, required


def decode(cls: type[T], body: dict[str, Any], op: str | None = None) -> T:
    types_, required = _schema(cls)
    for k in body:
        if k not in types_:
            unknown = sorted(str(k) for k in body if k not in types_)
            raise BadRequest(f"request [{op or cls.__name__}] does not support parameter "
                             f"[{', '.join(unknown)}]")
    kwargs = {}
    for name, tp in types_.items():
        if name in body:
            kwargs[name] = _check(name, body[name], tp)
        elif required[name]:
            raise BadRequest(f"[{name}] is required")
    return cls(**kwargs)


def encode(msg: Any) -> dict[str, Any]:
    return dataclasses.asdict(msg)


# ---- client -> coordinator ---------------------------------------------------------------

@dataclass(frozen=True)
class PutModelChunk:
    upload_id: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class PutModel:
    model_id: str
    upload_id: str
    sha256: str
    task: str = "pass_through"
    tokenizer: Optional[bytes] = None
    model_config: Optional[dict] = None


@dataclass(frozen=True)
class GetModels:
    model_id: Optional[str] = None


@dataclass(frozen=True)
class DeleteModel:
    model_id: str


@dataclass(frozen=True)
class StartDeployment:
    model_id: str
    deployment_id: Optional[str] = None
    number_of_allocations: Optional[int] = None
    threads_per_allocation: int = 1
    queue_capacity: int = 1024
    priority: str = "normal"
    cache_size: Optional[typing.Union[str, int]] = None
    timeout: typing.Union[str, int, float] = "30s"
    wait_for: str = "started"
    adaptive_allocations: Optional[dict] = None
    max_batch_size: int = 1
    max_batch_delay: typing.Union[str, int, float] = "0ms"


@dataclass(frozen=True)
class UpdateDeployment:
    deployment_id: str
    number_of_allocations: Optional[int] = None
    adaptive_allocations: Optional[dict] = None


@dataclass(frozen=True)
class StopDeployment:
    deployment_id: str
    force: bool = False
    allow_no_match: bool = True
    finish_pending_work: bool = False


@dataclass(frozen=True)
class DeploymentRef:
    """clear_cache, get_routing."""
    deployment_id: str


@dataclass(frozen=True)
class AwaitRoutes:
    """Wait until the deployment has an allocation to route to (scale from zero)."""
    deployment_id: str
    timeout_ms: int = 10_000


@dataclass(frozen=True)
class GetStats:
    deployment_id: Optional[str] = None


@dataclass(frozen=True)
class Empty:
    pass


# ---- client -> agent (inference endpoint) ------------------------------------------------

@dataclass(frozen=True)
class Infer:
    deployment_id: str
    docs: list
    timeout_ms: int = 10_000


# ---- agent -> coordinator ----------------------------------------------------------------

@dataclass(frozen=True)
class Register:
    node_id: str
    hostname: str
    transport_address: str
    allocated_processors: int
    cpu: dict
    memory: dict
    pid: int
    deployments: list = field(default_factory=list)


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    memory: dict
    deployments: list = field(default_factory=list)


@dataclass(frozen=True)
class ModelChunk:
    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class RouteReport:
    """One deployment as an agent runs it; part of register/heartbeat."""
    deployment_id: str
    routing_state: str
    current_allocations: int
    target_allocations: int
    reason: str = ""
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NodeAssignment:
    """coordinator -> agent: one deployment the node must run (part of ``sync``)."""
    deployment_id: str
    model_id: str
    sha256: str
    model_bytes: int
    task: str
    threads_per_allocation: int
    target_allocations: int
    queue_capacity: int
    cache_size_bytes: int
    priority: str
    stopping: bool = False
    finish_pending_work: bool = False
    routing_version: int = 0
    tokenizer_sha256: Optional[str] = None
    model_config: Optional[dict] = None
    max_batch_size: int = 1
    max_batch_delay_ms: float = 0.0

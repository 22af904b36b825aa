"""The wire format, decoded once at the edge.

Every message is one ZeroMQ frame holding a msgpack map (see docs/protocol.md):

    request  {"v": 1, "op": str, "id": int, "body": map}
    reply    {"v": 1, "id": int, "status": int, "body": map}

A ROUTER socket sees ``[identity, frame]``; a DEALER sends and receives ``[frame]``. Arrays travel
as ``{"dtype": str, "shape": [int], "data": bytes}`` in C order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mlfleet.common import PROTOCOL_VERSION
from mlfleet.common.errors import BadRequest

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # also set as ZMQ_MAXMSGSIZE on every socket


@dataclass(frozen=True)
class Request:
    op: str
    id: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int
    status: int
    body: dict[str, Any]
    rv: int = 0


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def encode_request(op: str, rid: int, body: dict[str, Any]) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "op": op, "id": rid, "body": body})


def encode_reply(rid: int, status: int, body: dict[str, Any], **extra: Any) -> bytes:
    """``extra`` carries envelope fields beside the body, e.g. ``rv`` (routing version) on inference."""
    return pack({"v": PROTOCOL_VERSION, "id": rid, "status": status, "body": body, **extra})


def encode_reply_raw(rid: int, status: int, body: bytes, **extra: Any) -> bytes:
    """A reply whose body is already msgpack (a cached or relayed body), without decoding it:
    the envelope map is written around the body's bytes."""
    fields = {"v": PROTOCOL_VERSION, "id": rid, "status": status, **extra}
    n = len(fields) + 1
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(pack(k) + pack(v) for k, v in fields.items()) + pack("body") + body


def _envelope(frame: bytes) -> dict[str, Any]:
    try:
        msg = unpack(frame)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise BadRequest(f"malformed message: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise BadRequest("malformed message: expected a map with [v], [op], [id] and [body]")
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version [{v}]; this server speaks [{PROTOCOL_VERSION}]")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise BadRequest("malformed message: [id] must be an integer")
    return msg


def decode_request(frame: bytes) -> Request:
    msg = _envelope(frame)
    op, body = msg.get("op"), msg.get("body", {})
    if not isinstance(op, str):
        raise BadRequest("malformed message: [op] must be a string")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("malformed message: [body] must be a map")
    return Request(op=op, id=msg["id"], body=body)


def request_id_of(frame: bytes) -> int:
    """Best effort: the id of a message that failed to decode, so the error can be matched."""
    try:
        msg = unpack(frame)
        rid = msg.get("id", 0) if isinstance(msg, dict) else 0
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else 0
    except Exception:
        return 0


def decode_reply(frame: bytes) -> Reply:
    msg = _envelope(frame)
    status, body = msg.get("status"), msg.get("body")
    if not isinstance(status, int) or not isinstance(body, dict):
        raise BadRequest("malformed reply: [status] must be an integer and [body] a map")
    rv = msg.get("rv", 0)
    return Reply(id=msg["id"], status=status, body=body, rv=rv if isinstance(rv, int) else 0)


# ---- arrays -------------------------------------------------------------------------------

_ARRAY_KEYS = frozenset(("dtype", "shape", "data"))


def encode_array(a: Any) -> dict[str, Any]:
    arr = np.asarray(a)  # ascontiguousarray would turn a 0-d array into shape (1,)
    return {"dtype": arr.dtype.str if arr.dtype.byteorder == ">" else arr.dtype.name,
            "shape": list(arr.shape), "data": arr.tobytes(order="C")}


def is_array(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.keys() == _ARRAY_KEYS


def decode_array(obj: dict[str, Any], where: str = "input") -> np.ndarray:
    try:
        dtype = np.dtype(obj["dtype"])
        if not isinstance(obj["shape"], list) or not all(
                type(s) is int and s >= 0 for s in obj["shape"]):
            raise ValueError("shape must be a list of non-negative integers")
        shape = tuple(obj["shape"])
        data = obj["data"]
        if dtype.hasobject or not isinstance(data, (bytes, bytearray)):
            raise ValueError("data must be bytes of a numeric dtype")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, KeyError) as e:
        raise BadRequest(f"[{where}] is not a valid array: {e}") from None


def encode_tree(obj: Any) -> Any:
    """numpy arrays (and torch-like objects with .numpy()) anywhere in lists/dicts -> wire arrays."""
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        return encode_array(obj)
    if isinstance(obj, dict):
        return {k: encode_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_tree(v) for v in obj]
    return obj


def decode_tree(obj: Any) -> Any:
    """Wire arrays anywhere in lists/dicts -> numpy arrays."""
    if is_array(obj):
        return decode_array(obj)
    if isinstance(obj, dict):
        return {k: decode_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v) for v in obj]
    return obj


def to_jsonable(obj: Any) -> Any:
    """numpy arrays -> nested lists; bytes -> hex (for printing bodies as JSON)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if is_array(obj):
        return decode_array(obj).tolist()
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    return obj

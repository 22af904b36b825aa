"""The wire format of every channel, decoded once at the edge (see docs/protocol.md).

A message is a header frame, a msgpack map, and, for inference only, payload frames after it:

    request  {"v": 2, "op": str, "id": int, "body": map}            [payload frames]
    reply    {"v": 2, "id": int, "status": int, "body": map, ...}   [payload frames]

The same envelope carries client <-> coordinator, agent <-> coordinator, client <-> agent and
agent <-> worker messages, and, length-framed, the agent <-> model host pipe (``PipeReader``).
A ROUTER socket sees ``[identity, header, *payload]``; a DEALER sends and receives
``[header, *payload]``.

A payload is a tree frame (msgpack: the documents of a request, the results of a reply) and the
frames of the large arrays in it. Arrays travel as ``{"dtype", "shape", "data": bytes}`` in C
order inside the tree, or, from ``INLINE_ARRAY_MAX`` bytes, as ``{"dtype", "shape", "frame": k}``
with their bytes in payload frame ``k`` (frame 0 is the tree): whoever relays a payload (the
agent) reads the header only and passes the payload frames on as they are, and whoever decodes
it builds arrays straight on the frames' buffers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np

from mlfleet.common import PROTOCOL_VERSION
from mlfleet.common.errors import BadRequest

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # also set as ZMQ_MAXMSGSIZE on every socket (per frame)
INLINE_ARRAY_MAX = 4096     # arrays of this many bytes and more travel in frames of their own
MAX_PAYLOAD_FRAMES = 4097   # the tree and up to 4096 array frames in one request or result

# What a body may hold, per op, checked while it is decoded (msgpack's own limits) and, for
# frames past SMALL_FRAME, a budget of containers so no frame expands into much more memory
# than its own size. Ops not listed get DEFAULT_LIMITS.
SMALL_FRAME = 64 << 10


@dataclass(frozen=True)
class Limits:
    max_frame: int = 1 << 20          # the whole frame
    max_bin: int = 1 << 20            # one bytes value
    max_str: int = 64 << 10           # one string
    max_array: int = 10_000           # items in one list
    max_map: int = 256                # keys in one map


DEFAULT_LIMITS = Limits()
# an inference request's or result's payload tree (the documents, the results)
PAYLOAD_LIMITS = Limits(max_frame=MAX_MESSAGE_BYTES, max_bin=MAX_MESSAGE_BYTES, max_str=16 << 20,
                        max_array=1 << 20)
OP_LIMITS = {
    "infer": DEFAULT_LIMITS,  # the header only: the payload is PAYLOAD_LIMITS, decoded by the worker
    "put_model_chunk": Limits(max_frame=(8 << 20) + 4096, max_bin=8 << 20),
    "put_model": Limits(max_frame=(32 << 20) + 4096, max_bin=32 << 20, max_map=4096),
    "register": Limits(max_frame=4 << 20, max_array=100_000),
    "heartbeat": Limits(max_frame=4 << 20, max_array=100_000),
}


class EnvelopeError(BadRequest):
    """A frame that is not a request envelope; ``request_id`` is its id when it could be read."""

    def __init__(self, reason: str, request_id: int = 0) -> None:
        super().__init__(reason)
        self.request_id = request_id


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
    payload: list[Any] = field(default_factory=list)  # frames after the header (inference results)


Buffer = Any  # bytes, memoryview, or a zmq.Frame: anything with the buffer protocol


def pack(obj: Any) -> bytes:
    frame: bytes = msgpack.packb(obj, use_bin_type=True)
    return frame


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def encode_request(op: str, rid: int, body: dict[str, Any]) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "op": op, "id": rid, "body": body})


def encode_reply(rid: int, status: int, body: dict[str, Any], **extra: Any) -> bytes:
    """``extra`` carries envelope fields beside the body, e.g. ``rv`` (routing version) on inference."""
    return pack({"v": PROTOCOL_VERSION, "id": rid, "status": status, "body": body, **extra})


def _container_header(n: int, fix: int, first: int) -> bytes:
    """msgpack's header of a map or array of ``n`` entries: the fix form (``fix | n``), else the
    16-bit form (``first``), else the 32-bit one (``first + 1``)."""
    if n < 16:
        return bytes([fix | n])
    if n < 1 << 16:
        return bytes([first]) + n.to_bytes(2, "big")
    return bytes([first + 1]) + n.to_bytes(4, "big")


def map_header(n: int) -> bytes:
    """msgpack's header of a map of ``n`` entries (its entries follow, packed)."""
    return _container_header(n, 0x80, 0xDE)


def array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` items (its items follow, packed)."""
    return _container_header(n, 0x90, 0xDC)


def encode_reply_raw(rid: int, status: int, body: bytes, **extra: Any) -> bytes:
    """A reply whose body is already msgpack (a cached or relayed body), without decoding it:
    the envelope map is written around the body's bytes."""
    fields = {"v": PROTOCOL_VERSION, "id": rid, "status": status, **extra}
    return (map_header(len(fields) + 1) + b"".join(pack(k) + pack(v) for k, v in fields.items())
            + pack("body") + body)


def _envelope(frame: bytes, limits: Limits | None = None) -> dict[str, Any]:
    if limits is not None:
        msg = unpack_limited(frame, limits)
    else:
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


class _Reader:
    """A file-like view of a frame, read in slices: msgpack's Unpacker streams through it, so
    skipping a huge body never holds a second copy of the frame."""

    def __init__(self, frame: bytes | memoryview) -> None:
        self.mv, self.pos = memoryview(frame), 0

    def read(self, n: int) -> bytes:
        out = self.mv[self.pos:self.pos + n].tobytes()
        self.pos += len(out)
        return out


def peek_request(frame: bytes | memoryview) -> tuple[str, int]:
    """The op and id of a request, read without decoding its body (skipped, never built): what a
    server needs to authorize a message before it trusts it with a decode. Raises BadRequest
    (with the id when it could be read) for anything that is not a request envelope. A large
    frame is streamed through in 64 KiB slices: no copy of it is made."""
    limits = dict(raw=False, max_str_len=256, max_bin_len=0, max_array_len=0, max_map_len=16,
                  strict_map_key=True)
    if len(frame) > SMALL_FRAME:
        # the buffer only grows past a few slices for one large value (a legitimate array's
        # bytes) being skipped; a body of many small values streams through in slices
        u = msgpack.Unpacker(_Reader(frame), read_size=SMALL_FRAME,
                             max_buffer_size=max(4 * SMALL_FRAME, len(frame)), **limits)
    else:
        u = msgpack.Unpacker(max_buffer_size=max(1, len(frame)), **limits)
        u.feed(frame)
    op: Any = None
    rid: Any = None
    v: Any = None
    try:
        n = u.read_map_header()
        if n > 16:
            raise ValueError("too many keys")
        for _ in range(n):
            key = u.unpack()
            if key in ("v", "op", "id"):
                value = u.unpack()
                if key == "v":
                    v = value
                elif key == "op":
                    op = value
                else:
                    rid = value
            else:
                u.skip()
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise EnvelopeError(f"malformed message: not a request envelope ({type(e).__name__})",
                            _int_or_zero(rid)) from None
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise EnvelopeError("malformed message: [id] must be an integer")
    rid = _int_or_zero(rid)
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise EnvelopeError(f"unsupported protocol version [{v!r:.20}]; this server speaks "
                            f"[{PROTOCOL_VERSION}]", rid)
    if not isinstance(op, str):
        raise EnvelopeError("malformed message: [op] must be a string", rid)
    return op, rid


def _int_or_zero(rid: Any) -> int:
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 63 else 0


def unpack_limited(frame: bytes, limits: Limits) -> Any:
    """Decode with msgpack's limits and, for frames past SMALL_FRAME, a budget of containers
    (maps and lists) of one per 16 bytes of frame (real documents hold far fewer): a body of
    empty maps (64 bytes each in memory, 1 byte on the wire) cannot expand into more than
    about 4x its size. Raises BadRequest naming the limit."""
    if len(frame) > limits.max_frame:
        raise BadRequest(f"malformed message: [{len(frame)}] bytes is more than this op takes "
                         f"([{limits.max_frame}])")
    kw: dict[str, Any] = {}
    if len(frame) > SMALL_FRAME:
        budget = [len(frame) // 16 + 64]

        def count(obj: Any) -> Any:
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError("more maps and lists than a frame this size may hold")
            return obj
        kw = {"object_hook": count, "list_hook": count}
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False, max_bin_len=limits.max_bin,
                               max_str_len=limits.max_str, max_array_len=limits.max_array,
                               max_map_len=limits.max_map, max_ext_len=0, **kw)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise BadRequest(f"malformed message: not valid msgpack within this op's limits "
                         f"({type(e).__name__}: {str(e)[:120]})") from None


def decode_request(frame: bytes, limits: Limits | None = None) -> Request:
    """Decode a whole request. Servers peek (``peek_request``) and authorize first, then decode
    with the op's limits (``OP_LIMITS``)."""
    msg = _envelope(frame, limits)
    op, body = msg.get("op"), msg.get("body", {})
    if not isinstance(op, str):
        raise BadRequest("malformed message: [op] must be a string")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("malformed message: [body] must be a map")
    return Request(op=op, id=msg["id"], body=body)


def decode_reply(frame: bytes) -> Reply:
    msg = _envelope(frame)
    status, body = msg.get("status"), msg.get("body")
    if not isinstance(status, int) or not isinstance(body, dict):
        raise BadRequest("malformed reply: [status] must be an integer and [body] a map")
    rv = msg.get("rv", 0)
    return Reply(id=msg["id"], status=status, body=body, rv=rv if isinstance(rv, int) else 0)


def decode_message(frame: Buffer) -> Request | Reply:
    """A frame a peer may send either way (what the coordinator sends an agent: replies to its
    requests, and pushes, which are requests): the version checked, then decoded as one or the
    other."""
    msg = _envelope(frame)
    if "op" in msg:
        return decode_request(frame)
    return decode_reply(frame)


def encode_infer(rid: int, body: dict[str, Any], docs: Any) -> list[Buffer]:
    """An inference request: its header (``body``: deployment_id, timeout_ms...) and its
    documents as a payload."""
    return [encode_request("infer", rid, body), *encode_payload(docs)]


# ---- arrays -------------------------------------------------------------------------------

_ARRAY_KEYS = frozenset(("dtype", "shape", "data"))


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}  # numpy builds dtype.name anew on each call (~8 us)
_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype_name(dt: np.dtype[Any]) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        if dt.hasobject:
            raise TypeError(f"an array of dtype [{dt}] cannot travel: it holds Python objects")
        name = dt.str if dt.byteorder == ">" else dt.name
        if len(_DTYPE_NAMES) < 256:
            _DTYPE_NAMES[dt] = name
    return name


def encode_array(a: Any) -> dict[str, Any]:
    """An array as the wire carries it, its bytes in C order. A large array's ``data`` is a view
    of the array's own bytes (no copy: it is sent as a frame as it is); a small one's is a copy
    (cheaper than a view at that size: it is packed into the tree anyway)."""
    arr = np.asarray(a)  # ascontiguousarray would turn a 0-d array into shape (1,)
    name = _dtype_name(arr.dtype)
    if arr.nbytes < INLINE_ARRAY_MAX or not arr.flags.c_contiguous:
        data: Any = arr.tobytes(order="C")
    else:
        data = memoryview(arr.reshape(-1).view(np.uint8).data)
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def is_array(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.keys() == _ARRAY_KEYS


def decode_array(obj: dict[str, Any], where: str = "input") -> np.ndarray:
    try:
        dtype = _DTYPES.get(obj["dtype"]) if type(obj["dtype"]) is str else None
        if dtype is None:
            dtype = np.dtype(obj["dtype"])
            if type(obj["dtype"]) is str and len(_DTYPES) < 256:
                _DTYPES[obj["dtype"]] = dtype
        if not isinstance(obj["shape"], list) or not all(
                type(s) is int and s >= 0 for s in obj["shape"]):
            raise ValueError("shape must be a list of non-negative integers")
        shape = tuple(obj["shape"])
        data = obj["data"]
        if dtype.hasobject or not isinstance(data, (bytes, bytearray, memoryview)):
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


# ---- payloads: a tree frame and the frames of its large arrays ----------------------------------

_FRAME_KEYS = frozenset(("dtype", "shape", "frame"))


def encode_payload(tree: Any) -> list[Buffer]:
    """A tree (documents, results) -> ``[tree frame, *array buffers]``. numpy arrays and wire
    arrays of ``INLINE_ARRAY_MAX`` bytes or more go in frames of their own, by reference to
    their buffers (send them with ``copy=False``); smaller ones stay in the tree."""
    frames: list[Buffer] = [b""]

    def walk(obj: Any) -> Any:
        t = type(obj)
        if t is str or t is int or t is float or obj is None:  # the common leaves, first
            return obj
        if t is dict:
            if len(obj) == 3 and obj.keys() == _ARRAY_KEYS:
                data = obj["data"]
                if isinstance(data, (bytes, bytearray, memoryview)) and len(data) >= INLINE_ARRAY_MAX:
                    if len(frames) >= MAX_PAYLOAD_FRAMES:
                        raise ValueError(f"more than [{MAX_PAYLOAD_FRAMES - 1}] large arrays in one message")
                    frames.append(data)
                    return {"dtype": obj["dtype"], "shape": obj["shape"], "frame": len(frames) - 1}
                return obj
            return {k: walk(v) for k, v in obj.items()}
        if t is list or t is tuple:
            return [walk(v) for v in obj]
        if t is np.ndarray or isinstance(obj, (np.ndarray, np.generic)):
            return walk(encode_array(obj))
        return obj

    frames[0] = pack(walk(tree))
    return frames


def decode_payload(frames: Sequence[Buffer], limits: Limits) -> Any:
    """``[tree frame, *array frames]`` -> the tree, its frame references replaced by wire arrays
    whose ``data`` is a view of the frame (no copy). The tree is decoded within ``limits``; a
    reference to a frame that is not there, or an array frame nothing refers to, is a 400."""
    if not frames:
        raise BadRequest("malformed message: no payload frame")
    if len(frames) > MAX_PAYLOAD_FRAMES:
        raise BadRequest(f"malformed message: [{len(frames)}] payload frames; at most "
                         f"[{MAX_PAYLOAD_FRAMES}] are taken")
    tree = unpack_limited(_buf(frames[0]), limits)
    if len(frames) == 1:
        return tree
    views = [_buf(f) for f in frames]
    used = [False] * len(frames)

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj.keys() == _FRAME_KEYS:
                k = obj["frame"]
                if type(k) is not int or not 0 < k < len(views) or used[k]:
                    raise BadRequest(f"malformed message: [frame] [{k!r:.20}] is not an unused payload "
                                     f"frame (1 to {len(views) - 1})")
                used[k] = True
                return {"dtype": obj["dtype"], "shape": obj["shape"], "data": views[k]}
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    tree = walk(tree)
    if not all(used[1:]):
        raise BadRequest("malformed message: a payload frame no array refers to")
    return tree


def _buf(frame: Buffer) -> Any:
    """The bytes of a frame without a copy: a zmq.Frame's buffer, or the object itself."""
    b = getattr(frame, "buffer", None)
    return frame if b is None else b


def payload_size(frames: Sequence[Buffer]) -> int:
    return sum(len(_buf(f)) for f in frames)


def payload_key(frames: Sequence[Buffer], salt: bytes = b"") -> bytes:
    """A digest of a payload's frames as they travel (no decode, no copy): the cache key."""
    h = hashlib.blake2b(salt, digest_size=20)
    for f in frames:
        b = _buf(f)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


# ---- the model host's pipe ---------------------------------------------------------------------

def encode_pipe(op: str, body: dict[str, Any]) -> bytes:
    """One message on a pipe (agent <-> model host): a 4-byte big-endian length, then the same
    envelope as on the sockets."""
    frame = encode_request(op, 0, body)
    return len(frame).to_bytes(4, "big") + frame


class PipeReader:
    """Splits a byte stream into pipe messages; ``feed`` returns the requests it completed. A
    message that is not a request envelope of this protocol version, or is larger than
    ``max_frame``, raises BadRequest (the stream cannot be trusted after it)."""

    def __init__(self, max_frame: int = 1 << 20) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Request]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if n > self.max_frame:
                raise BadRequest(f"malformed pipe message: [{n}] bytes is more than [{self.max_frame}]")
            if len(self.buf) < 4 + n:
                break
            frame = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            out.append(decode_request(frame, DEFAULT_LIMITS))
        return out

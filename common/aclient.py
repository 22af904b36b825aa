"""The asyncio client: ``mlfleet.AsyncClient``, the same calls and behaviour as ``Client``, as
coroutines on pyzmq's asyncio sockets (one event loop, no I/O thread).

Admin calls go to the coordinator; inference goes straight to an agent picked from the
deployment's routing table (weighted by current allocations; ``client.Routes``), cached and
refreshed when an agent reports a newer routing version or a node answers that it no longer
serves the deployment. A request that never reached a node (no connection) or that a node
refused as not its own is retried on another; one that was sent is never run twice.

The wire format is ``common.protocol``'s (``encode_request``/``decode_reply``), the errors
``common.errors``' (``from_body``): a server's answer is raised as the server gave it.

    async with AsyncClient("tcp://127.0.0.1:7600") as c:
        out = await c.infer("my-model", [{"input": np.zeros((1, 8), np.float32)}])
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from pathlib import Path
from typing import Any, Optional

import zmq
import zmq.asyncio

from mlfleet.common import errors
from mlfleet.common.client import (
    CONNECT_TIMEOUT_S,
    DEFAULT_COORDINATOR,
    INFER_CONNECT_TIMEOUT_S,
    INFER_MARGIN_S,
    ROUTING_TTL_S,
    UPLOAD_CHUNK,
    Routes,
    _encode,
    _encode_payload,
    _infer_timeout_s,
    _results,
    handshake_failure,
    start_wait_s,
)
from mlfleet.common.errors import ApiError, NoAnswer, ServiceUnavailable
from mlfleet.common.protocol import PAYLOAD_LIMITS, Buffer, Reply, decode_payload, decode_reply
from mlfleet.common.security import Curve, client_curve
from mlfleet.common.units import parse_time
from mlfleet.common.zmqutil import make_socket


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _expire(fut: asyncio.Future, why: str) -> None:
    if not fut.done():
        fut.set_exception(NoAnswer(why))


def _delivered(sent: Optional[asyncio.Future[Any]]) -> bool:
    """A send that completed: libzmq took it on a live connection (IMMEDIATE), so it may have
    reached the server."""
    return sent is not None and sent.done() and not sent.cancelled() and sent.exception() is None


class _Peer:
    """One DEALER to one address, the requests waiting on it, and the task reading its replies."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, curve: Optional[Curve],
                 server_key: Optional[bytes]) -> None:
        self.address = address
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: fail fast otherwise
        if curve is not None:
            curve.client(self.sock, server_key)
        self.failed: Optional[str] = None  # why the handshake failed, said at once
        self.keyed = curve is not None
        mon = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(address)
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.sends: dict[int, asyncio.Future[Any]] = {}  # rid -> its send (done: handed to a connection)
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read())
        self.monitor = loop.create_task(self._watch(mon))

    async def _read(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=False)  # a header, and results' frames
                try:
                    rep = decode_reply(frames[0].buffer)
                except ApiError:
                    continue
                rep.payload.extend(frames[1:])
                fut = self.pending.pop(rep.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(rep)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    async def _watch(self, mon: zmq.asyncio.Socket) -> None:
        """A handshake that fails says why at once, instead of a timeout that says nothing."""
        from zmq.utils.monitor import parse_monitor_message
        try:
            while True:
                ev = parse_monitor_message(await mon.recv_multipart())
                if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.failed = None
                    continue
                self.failed = handshake_failure(self.address, ev["event"], ev["value"], self.keyed)
                for rid, fut in self.pending.items():
                    if fut.done():
                        continue
                    if not _delivered(self.sends.get(rid)):
                        # IMMEDIATE: nothing was delivered on a connection that never completed
                        fut.set_exception(NoAnswer(self.failed, retryable=True))
                    else:
                        # sent on the connection that was lost: it may have run, and its answer
                        # cannot come back on another connection; never run it twice
                        fut.set_exception(NoAnswer(
                            f"no answer from {self.address} to a request already sent: the connection "
                            f"was lost and reconnecting failed ({self.failed}); it may have run, so it "
                            "is not retried", retryable=False))
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            mon.close(0)

    async def call(self, frames: list[Buffer], rid: int, wait_s: float, connect_s: float, op: str) -> Reply:
        """Send and wait. ``NoAnswer(retryable=True)`` when it could not even be sent."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        self.pending[rid] = fut
        timer = None
        sent: Optional[asyncio.Future[Any]] = None
        try:
            if self.failed is not None:
                raise NoAnswer(self.failed, retryable=True)
            sent = self.sends[rid] = self.sock.send_multipart(frames, copy=False)  # pyzmq copies small frames
            if not sent.done():  # no live connection yet (IMMEDIATE): wait for one, briefly
                connect_s = min(wait_s, connect_s)
                try:
                    await asyncio.wait_for(asyncio.wait([sent, fut], return_when=asyncio.FIRST_COMPLETED),
                                           connect_s)
                except TimeoutError:
                    sent.cancel()
                    raise NoAnswer(f"no answer from {self.address}: could not connect within "
                                   f"{connect_s:g}s (is it running? off loopback it needs a CURVE key)",
                                   retryable=True) from None
                if fut.done():  # the handshake failed: the monitor said why
                    sent.cancel()
                    return fut.result()
                if not sent.done():
                    raise NoAnswer(f"no answer from {self.address}: could not connect within "
                                   f"{connect_s:g}s", retryable=True)
            sent.result()  # raises what the send raised
            # a timer, not wait_for: no task per request on the hot path
            timer = loop.call_later(wait_s, _expire, fut, f"no answer from {self.address} to [{op}] "
                                    f"within {wait_s:g}s")
            return await fut
        finally:
            if sent is not None and not sent.done():
                sent.cancel()  # still queued in pyzmq (cancelled, or failed): never sent later
            if timer is not None:
                timer.cancel()
            self.pending.pop(rid, None)
            self.sends.pop(rid, None)

    def close(self) -> None:
        self.reader.cancel()
        self.monitor.cancel()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(NoAnswer("client closed"))
        self.sock.close(0)


class AsyncClient:
    """``Client``'s calls as coroutines. Use from one event loop; close with ``await close()``
    or ``async with``."""

    def __init__(self, coordinator: str | None = None, *, request_timeout: str | float = "30s",
                 secret_key: str | None = None, server_public_key: str | None = None,
                 routing_ttl: str | float = ROUTING_TTL_S) -> None:
        self.coordinator = coordinator or os.environ.get("MLFLEET_COORDINATOR") or DEFAULT_COORDINATOR
        self.request_timeout_s = parse_time(request_timeout, "request_timeout")
        self.routing_ttl_s = parse_time(routing_ttl, "routing_ttl")
        self._ids = itertools.count(1)
        self._curve = client_curve(secret_key, server_public_key)
        self._agent_keys: dict[str, bytes] = {}
        self._ctx = zmq.asyncio.Context()
        self._peers: dict[str, _Peer] = {}
        self._routing: dict[str, Routes] = {}
        self._closed = False

    # ---- plumbing ------------------------------------------------------------------------------
    async def close(self) -> None:
        self._closed = True
        for p in self._peers.values():
            p.close()
        self._peers.clear()
        self._ctx.destroy(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _peer(self, address: str) -> _Peer:
        if self._closed:
            raise NoAnswer("client closed")
        p = self._peers.get(address)
        if p is None:
            server_key = self._agent_keys.get(address) if address != self.coordinator else None
            p = self._peers[address] = _Peer(self._ctx, address, self._curve, server_key)
        return p

    def _drop(self, address: str) -> None:
        """A fresh socket next time (lazy pirate): a late reply on the old one is never mistaken."""
        p = self._peers.pop(address, None)
        if p is not None:
            p.close()

    async def _send(self, address: str, op: str, body: dict[str, Any], wait_s: float,
                    connect_s: float = CONNECT_TIMEOUT_S, payload: list[Buffer] | None = None) -> Reply:
        rid = next(self._ids)
        try:
            return await self._peer(address).call([_encode(op, rid, body), *(payload or [])], rid, wait_s,
                                                  connect_s, op)
        except NoAnswer:
            p = self._peers.get(address)
            if p is not None and not p.pending:  # others waiting on it keep it
                self._drop(address)
            raise

    async def _call(self, op: str, body: dict[str, Any], wait_s: float | None = None) -> dict[str, Any]:
        rep = await self._send(self.coordinator, op, body, wait_s or self.request_timeout_s)
        if rep.status != 200:
            raise errors.from_body(rep.body)
        return rep.body

    async def call(self, op: str, body: dict[str, Any], wait_s: float | None = None) -> dict[str, Any]:
        """Any coordinator op by name (docs/protocol.md), for what has no method of its own."""
        return await self._call(op, body, wait_s)

    # ---- models --------------------------------------------------------------------------------
    async def put_model_bytes(self, model_id: str, data: bytes | memoryview, task: str = "pass_through",
                              tokenizer: bytes | None = None,
                              model_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """``put_model`` from bytes in memory (the gateway's uploads)."""
        upload_id = os.urandom(16).hex()
        view = memoryview(data)
        for offset in range(0, len(view), UPLOAD_CHUNK):
            await self._call("put_model_chunk", {"upload_id": upload_id, "offset": offset,
                                                 "data": bytes(view[offset:offset + UPLOAD_CHUNK])})
        # hashing a large definition takes a while: off the event loop (hashlib drops the GIL)
        digest = (await asyncio.to_thread(_sha256, view) if len(view) >= 1 << 20 else _sha256(view))
        body: dict[str, Any] = {"model_id": model_id, "upload_id": upload_id, "sha256": digest, "task": task}
        if tokenizer is not None:
            body["tokenizer"] = tokenizer
        if model_config is not None:
            body["model_config"] = model_config
        return await self._call("put_model", body)

    async def put_model(self, model_id: str, path: str | os.PathLike[str], task: str = "pass_through",
                        tokenizer: str | os.PathLike[str] | None = None,
                        model_config: dict[str, Any] | None = None) -> dict[str, Any]:
        data = await asyncio.to_thread(Path(path).read_bytes)
        tok = await asyncio.to_thread(Path(tokenizer).read_bytes) if tokenizer is not None else None
        return await self.put_model_bytes(model_id, data, task, tok, model_config)

    async def get_models(self, model_id: str | None = None) -> dict[str, Any]:
        return await self._call("get_models", {"model_id": model_id} if model_id else {})

    async def delete_model(self, model_id: str) -> dict[str, Any]:
        return await self._call("delete_model", {"model_id": model_id})

    # ---- deployments ---------------------------------------------------------------------------
    async def start_deployment(self, model_id: str, deployment_id: str | None = None,
                               number_of_allocations: int | None = None, threads_per_allocation: int = 1,
                               queue_capacity: int = 1024, priority: str = "normal",
                               cache_size: str | None = None, timeout: str = "30s",
                               wait_for: str = "started",
                               adaptive_allocations: dict[str, Any] | None = None,
                               max_batch_size: int | None = None,
                               max_batch_delay: str | None = None) -> dict[str, Any]:
        optional = {"deployment_id": deployment_id, "number_of_allocations": number_of_allocations,
                    "cache_size": cache_size, "adaptive_allocations": adaptive_allocations,
                    "max_batch_size": max_batch_size, "max_batch_delay": max_batch_delay}
        body = {"model_id": model_id, "threads_per_allocation": threads_per_allocation,
                "queue_capacity": queue_capacity, "priority": priority, "timeout": timeout,
                "wait_for": wait_for, **{k: v for k, v in optional.items() if v is not None}}
        return await self._call("start_deployment", body, start_wait_s(timeout, self.request_timeout_s))

    async def update_deployment(self, deployment_id: str, number_of_allocations: int | None = None,
                                adaptive_allocations: dict[str, Any] | None = None) -> dict[str, Any]:
        optional = {"number_of_allocations": number_of_allocations,
                    "adaptive_allocations": adaptive_allocations}
        return await self._call("update_deployment", {"deployment_id": deployment_id, **{
            k: v for k, v in optional.items() if v is not None}})

    async def stop_deployment(self, deployment_id: str, force: bool = False, allow_no_match: bool = True,
                              finish_pending_work: bool = False) -> dict[str, Any]:
        self._routing.pop(deployment_id, None)
        return await self._call("stop_deployment", {
            "deployment_id": deployment_id, "force": force, "allow_no_match": allow_no_match,
            "finish_pending_work": finish_pending_work}, max(self.request_timeout_s, 40.0))

    async def clear_cache(self, deployment_id: str) -> dict[str, Any]:
        return await self._call("clear_cache", {"deployment_id": deployment_id})

    async def get_stats(self, deployment_id: str | None = None) -> dict[str, Any]:
        return await self._call("get_stats", {"deployment_id": deployment_id} if deployment_id else {})

    async def get_nodes(self) -> dict[str, Any]:
        return await self._call("get_nodes", {})

    async def get_routing(self, deployment_id: str) -> dict[str, Any]:
        return await self._call("get_routing", {"deployment_id": deployment_id})

    # ---- inference -----------------------------------------------------------------------------
    def _remember(self, deployment_id: str, body: dict[str, Any]) -> Routes:
        r = Routes(body, time.monotonic())
        for route in r.routes:
            if route.get("public_key"):
                self._agent_keys[route["address"]] = route["public_key"].encode()
        self._routing[deployment_id] = r
        return r

    async def _routes(self, deployment_id: str, refresh: bool = False) -> Routes:
        r = self._routing.get(deployment_id)
        if r is None or refresh or time.monotonic() - r.fetched > self.routing_ttl_s:
            try:
                body = await self.get_routing(deployment_id)
            except NoAnswer:
                if r is None:
                    raise
                # the coordinator is away: keep serving from the table we have, ask again later
                r.fetched = time.monotonic() - self.routing_ttl_s + min(5.0, self.routing_ttl_s)
                return r
            r = self._remember(deployment_id, body)
        return r

    async def _await_routes(self, deployment_id: str, until: float) -> Routes:
        """No allocation to send to: the coordinator answers once one serves (starting one if the
        deployment scaled to zero), or with 408 at our deadline."""
        left = max(0.001, until - time.monotonic())
        body = await self._call("await_routes", {"deployment_id": deployment_id,
                                                 "timeout_ms": max(1, int(left * 1000))},
                                left + INFER_MARGIN_S)
        return self._remember(deployment_id, body)

    async def infer(self, deployment_id: str, docs: list[dict[str, Any]],
                    timeout: str | float = "10s", inference_config: Optional[dict[str, Any]] = None, *,
                    decode: bool = True) -> dict[str, Any]:
        """Run ``docs`` through a deployment; arrays in and out are numpy arrays (with
        ``decode=False`` results keep the wire's array maps). ``inference_config``: as
        ``Client.infer``."""
        timeout_s = _infer_timeout_s(timeout)
        payload = _encode_payload(docs)
        extra = {} if inference_config is None else {"inference_config": inference_config}
        deadline = time.monotonic() + timeout_s + INFER_MARGIN_S
        routes = await self._routes(deployment_id)
        tried: set[str] = set()
        last: ApiError | None = None
        unallocated = f"Trained model deployment [{deployment_id}] is not allocated to any nodes"
        for _attempt in range(8):
            route = routes.pick(tried)
            if route is None:
                routes = await self._routes(deployment_id, refresh=True)
                route = routes.pick(tried)
                if route is None:
                    if time.monotonic() >= deadline - INFER_MARGIN_S:
                        raise last or ServiceUnavailable(unallocated)
                    routes = await self._await_routes(deployment_id, deadline - INFER_MARGIN_S)
                    tried = set()  # what answers now has an allocation again
                    route = routes.pick(tried)
                    if route is None:
                        raise ServiceUnavailable(unallocated)
            address = route["address"]
            left_s = deadline - INFER_MARGIN_S - time.monotonic()  # a retry gets what is left
            body = {"deployment_id": deployment_id, "timeout_ms": max(1, int(left_s * 1000)), **extra}
            try:
                rep = await self._send(address, "infer", body, max(0.1, deadline - time.monotonic()),
                                       INFER_CONNECT_TIMEOUT_S, payload)
            except NoAnswer as e:
                if not e.retryable:
                    raise  # sent, maybe started: not ours to run twice
                last = e
                tried.add(address)
                routes = await self._routes(deployment_id, refresh=True)
                continue
            if rep.rv > routes.version:
                self._routing.pop(deployment_id, None)
            if rep.status == 200:
                if decode:
                    return _results(rep)
                if not rep.payload:
                    raise errors.ServerError("malformed reply: an inference answer without its results frame")
                return {**rep.body, "inference_results": decode_payload(rep.payload, PAYLOAD_LIMITS)}
            err = errors.from_body(rep.body)
            if not err.retryable:
                raise err
            last = err  # the node no longer serves it; the request never ran: try another
            tried.add(address)
            routes = await self._routes(deployment_id, refresh=True)
        raise last or ServiceUnavailable(f"no node could serve deployment [{deployment_id}]")

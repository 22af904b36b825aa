"""The gateway's uploads against a scripted coordinator (a real ZeroMQ ROUTER that holds a
model's store open until the test lets it finish): what a DELETE does while the model is being
stored."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import pytest
import zmq
from aiohttp import ClientSession

from mlfleet.common.errors import NotFound
from mlfleet.common.protocol import decode_request, encode_reply
from mlfleet.gateway.server import Gateway, GatewayConfig
from tests.gateway_support import es_error

pytestmark = pytest.mark.timeout(60)

CONFIG = {"inference_config": {"pass_through": {}}}


class Coordinator(threading.Thread):
    """Answers get_models from what was stored; holds each put_model_chunk until ``release``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.storing = threading.Event()
        self.release = threading.Event()
        self.stop = threading.Event()
        self.ops: list[tuple[str, dict[str, Any]]] = []
        self.stored: set[str] = set()

    def answer(self, op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if op == "get_models":
            mid = body.get("model_id")
            if mid in self.stored:
                return 200, {"count": 1, "trained_model_configs": [{"model_id": mid}]}
            return 404, NotFound(f"Could not find trained model [{mid}]").to_body()
        if op == "put_model_chunk":
            self.storing.set()
            assert self.release.wait(30), "the test never released the store"
            return 200, {}
        if op == "put_model":
            self.stored.add(body["model_id"])
            return 200, {"model_id": body["model_id"]}
        if op == "delete_model":
            self.stored.discard(body["model_id"])
            return 200, {"acknowledged": True}
        return 400, {"error": {"type": "illegal_argument_exception", "reason": f"unscripted op [{op}]"}}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(50):
                    continue
                ident, frame, *_ = self.sock.recv_multipart()
                req = decode_request(frame)
                self.ops.append((req.op, req.body))
                status, body = self.answer(req.op, req.body)
                self.sock.send_multipart([ident, encode_reply(req.id, status, body)])
        finally:
            self.sock.close(0)
            self.ctx.term()

    def end(self) -> None:
        self.release.set()
        self.stop.set()
        self.join(10)
        assert not self.is_alive()


def part(data: bytes) -> dict[str, Any]:
    return {"definition": base64.b64encode(data).decode(), "total_definition_length": len(data),
            "total_parts": 1}


def _with_gateway(coord: Coordinator, body: Any, hold_stores: bool = False) -> None:
    """Run ``body(gw, go)`` against an in-process gateway on ``coord``; ends both. Stores
    complete at once unless ``hold_stores`` (then when the test sets ``coord.release``)."""
    async def scenario() -> None:
        gw = Gateway(GatewayConfig(listen="http://127.0.0.1:0", coordinator=coord.endpoint,
                                   request_timeout_s=20))
        ep = await gw.start()
        try:
            async with ClientSession() as s:
                async def go(method: str, path: str, b: Any = None) -> tuple[int, Any]:
                    async with s.request(method, ep + path, json=b) as r:
                        return r.status, await r.json()
                await body(gw, go)
        finally:
            await gw.stop()
    if not hold_stores:
        coord.release.set()
    coord.start()
    try:
        asyncio.run(scenario())
    finally:
        coord.end()


def test_delete_while_the_model_is_being_stored_is_409_and_the_model_stays_deletable():
    coord = Coordinator()

    async def body(gw: Gateway, go: Any) -> None:
        assert (await go("PUT", "/_ml/trained_models/a", CONFIG))[0] == 200
        last = asyncio.create_task(go("PUT", "/_ml/trained_models/a/definition/0", part(b"old")))
        assert await asyncio.to_thread(coord.storing.wait, 20)
        status, err = await go("DELETE", "/_ml/trained_models/a")
        assert status == 409, err
        reason = es_error(err, 409, "status_exception")
        assert "[a]" in reason and "being stored" in reason
        coord.release.set()
        assert await asyncio.wait_for(last, 20) == (200, {"acknowledged": True})
        assert coord.stored == {"a"}
        assert not any(op == "delete_model" for op, _ in coord.ops)  # the refused DELETE never went
        # stored: a DELETE now reaches the coordinator
        assert await go("DELETE", "/_ml/trained_models/a") == (200, {"acknowledged": True})
        assert coord.stored == set()
    _with_gateway(coord, body, hold_stores=True)


def test_pending_uploads_are_capped_in_total_bytes_naming_the_limit():
    async def body(gw: Gateway, go: Any) -> None:
        gw.uploads.max_pending_bytes = 100
        for mid in ("a", "b"):
            assert (await go("PUT", f"/_ml/trained_models/{mid}", CONFIG))[0] == 200
        half = {**part(b"x" * 60), "total_definition_length": 120, "total_parts": 2}
        # a definition larger than the whole allowance can never complete: 400 at once
        status, err = await go("PUT", "/_ml/trained_models/a/definition/0", half)
        assert status == 400, err
        assert "[total_definition_length] [120]" in es_error(err, 400, "illegal_argument_exception")
        assert "[100]" in err["error"]["reason"]
        one = {**part(b"x" * 60), "total_definition_length": 80, "total_parts": 2}
        assert await go("PUT", "/_ml/trained_models/a/definition/0", one) == (200, {"acknowledged": True})
        status, err = await go("PUT", "/_ml/trained_models/b/definition/0", one)
        assert status == 429, err
        reason = es_error(err, 429, "circuit_breaking_exception")
        assert "[120]" in reason and "[100]" in reason and "uploads in progress" in reason
        # the held upload finishes; its bytes no longer count
        last = {**part(b"y" * 20), "total_definition_length": 80, "total_parts": 2}
        assert await go("PUT", "/_ml/trained_models/a/definition/1", last) == (200, {"acknowledged": True})
        assert await go("PUT", "/_ml/trained_models/b/definition/0", one) == (200, {"acknowledged": True})
    _with_gateway(Coordinator(), body)


def test_an_idle_pending_upload_expires():
    from tests.helpers import FakeClock
    clock = FakeClock()

    async def body(gw: Gateway, go: Any) -> None:
        gw.uploads.clock = clock
        assert (await go("PUT", "/_ml/trained_models/a", CONFIG))[0] == 200
        one = {**part(b"x" * 10), "total_definition_length": 20, "total_parts": 2}
        assert (await go("PUT", "/_ml/trained_models/a/definition/0", one))[0] == 200
        clock.t += gw.uploads.idle_expiry_s - 1  # touched within the expiry: kept
        assert (await go("GET", "/_ml/trained_models/a"))[0] == 200
        clock.t += 2
        status, err = await go("GET", "/_ml/trained_models/a")
        assert status == 404, err
        status, err = await go("PUT", "/_ml/trained_models/a/definition/1", one)
        assert status == 404, err
        # and its id is free again
        assert (await go("PUT", "/_ml/trained_models/a", CONFIG))[0] == 200
    _with_gateway(Coordinator(), body)

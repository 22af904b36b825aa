"""Overhead of the serving path: a no-op (identity) model through Client.infer, against a raw
pyzmq DEALER/ROUTER round trip with the same payload to an echo process; then the same for a
1 MiB tensor (the raw side echoes the same 1 MiB of bytes). Between them, the floor: the same
frames through a bare Python relay with the agent's two hops (a ZeroMQ ROUTER, then an AF_UNIX
stream to an echo process) and no work at all, which is what two Python hops cost here.

    .venv/bin/python -m bench.overhead [--requests 3000] [--large-requests 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zmq

from bench._util import cluster, fmt, pct, table
from mlfleet.common import stream
from mlfleet.common.protocol import encode_infer
from mlfleet.common.zmqutil import send_frames
from tests.helpers import save_model


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _echo(endpoint_q: mp.Queue, stop: mp.Event) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    endpoint_q.put(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(100):
            while True:
                try:
                    ident, frame = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                s.send_multipart([ident, frame])
    s.close(0)
    ctx.term()


def round_trips(server: Any, send: Callable[[zmq.Socket], Any], recv: Callable[[zmq.Socket], Any],
                n: int, inflight: int) -> tuple[list[float], float]:
    """Start ``server(endpoint_q, stop)`` in another process, then from a DEALER: ``n``
    sequential round trips (ms each, after 200 to warm up) and, with ``inflight`` > 1, req/s with
    ``inflight`` outstanding over ``2 n`` more."""
    q, stop = mp.Queue(), mp.Event()
    p = mp.Process(target=server, args=(q, stop))
    p.start()
    try:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(q.get(timeout=10))
        for _ in range(200):
            send(s)
            recv(s)
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            send(s)
            recv(s)
            lat.append((time.perf_counter() - t) * 1000)
        rps = 0.0
        if inflight > 1:
            t0 = time.perf_counter()
            for _ in range(inflight):
                send(s)
            sent = inflight
            for _ in range(n * 2):
                recv(s)
                if sent < n * 2:
                    send(s)
                    sent += 1
            rps = n * 2 / (time.perf_counter() - t0)
        s.close(0)
        ctx.term()
        return lat, rps
    finally:
        stop.set()
        p.join(10)


def raw_zmq(payload: bytes, n: int, inflight: int) -> tuple[list[float], float]:
    """Round trips of ``payload`` to a pyzmq echo: the raw baseline."""
    return round_trips(_echo, lambda s: s.send(payload), lambda s: s.recv(), n, inflight)


def _stream_echo(path: str) -> None:
    """The floor's worker: echoes each message on an AF_UNIX stream (common/stream.py framing)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    reader, inbox = stream.Reader(s), []
    try:
        while True:
            while not inbox:
                inbox = reader.read()
            stream.send_blocking(s, inbox.pop(0))
    except (EOFError, ConnectionError):
        pass


def _bare_relay(endpoint_q: mp.Queue, stop: mp.Event) -> None:
    """The floor's agent: a ZeroMQ ROUTER for clients and an AF_UNIX stream to one echo process,
    the agent's two hops with nothing in between (no decoding, no queue, no checks)."""
    d = tempfile.mkdtemp(prefix="mlfleet-floor-")
    path = f"{d}/w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    echo = mp.Process(target=_stream_echo, args=(path,))
    echo.start()
    conn, _ = listener.accept()
    conn.setblocking(False)
    reader, writer = stream.Reader(conn), stream.Writer(conn)
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    endpoint_q.put(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    idents: list[bytes] = []
    fd = conn.fileno()
    while not stop.is_set():
        for sock, ev in poller.poll(100):
            if sock is front:
                while front.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    ident, *frames = front.recv_multipart(copy=False)
                    idents.append(ident.bytes)
                    if not writer.send(frames):
                        poller.modify(fd, zmq.POLLIN | zmq.POLLOUT)
                continue
            if ev & zmq.POLLOUT and writer.flush():
                poller.modify(fd, zmq.POLLIN)
            if ev & zmq.POLLIN:
                for msg in reader.read():
                    send_frames(front, [idents.pop(0), *msg])
    conn.close()
    echo.join(10)
    front.close(0)
    ctx.term()
    shutil.rmtree(d, ignore_errors=True)


def bare_relay(frames: list, n: int, inflight: int) -> tuple[list[float], float]:
    """Round trips through ``_bare_relay``: the floor two Python hops set, before any of mlfleet's
    own work."""
    return round_trips(_bare_relay, lambda s: send_frames(s, frames, 0),
                       lambda s: s.recv_multipart(copy=False), n, inflight)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--large-requests", type=int, default=300)
    args = ap.parse_args()
    x = np.ones((1, 16), np.float32)
    frames = encode_infer(1, {"deployment_id": "noop", "timeout_ms": 10000}, [{"input": x}])
    payload = b"".join(bytes(f) for f in frames)  # the same bytes, in one frame
    raw_lat, raw_rps = raw_zmq(payload, args.requests, args.inflight)
    rows = [["raw pyzmq DEALER/ROUTER echo (another process)", fmt(pct(raw_lat, 50)),
             fmt(pct(raw_lat, 99)), f"{raw_rps:.0f}", "-", "1.0x"]]
    floor_lat, floor_rps = bare_relay(list(frames), args.requests, args.inflight)
    rows.append(["floor: bare Python relay, ZeroMQ + stream hop, no work", fmt(pct(floor_lat, 50)),
                 fmt(pct(floor_lat, 99)), f"{floor_rps:.0f}", "-",
                 f"{pct(floor_lat, 50) / pct(raw_lat, 50):.1f}x"])
    with cluster(processors=2) as c, c.client() as client:
        client.put_model("noop", save_model(Identity(), c.workdir / "noop.pt"))
        for allocations, batch in ((1, 1), (2, 1), (1, 16), (2, 16)):
            dep = f"noop-{allocations}-{batch}"
            client.start_deployment("noop", deployment_id=dep, number_of_allocations=allocations,
                                    cache_size="0b", max_batch_size=batch, wait_for="fully_allocated")
            lat, threads_rps, many_rps = mlfleet_dep(client, dep, x, args.requests, args.inflight)
            rows.append([f"Client.infer, {allocations} allocation(s), max_batch_size {batch}",
                         fmt(pct(lat, 50)), fmt(pct(lat, 99)), f"{threads_rps:.0f}", f"{many_rps:.0f}",
                         f"{pct(lat, 50) / pct(raw_lat, 50):.1f}x"])
            client.stop_deployment(dep)
        big = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)  # 1 MiB
        dep = "noop-large"
        client.start_deployment("noop", deployment_id=dep, cache_size="0b", wait_for="fully_allocated")
        big_lat = latency(lambda: client.infer(dep, [{"input": big}]), args.large_requests)
        out = client.infer(dep, [{"input": big}])["inference_results"][0]["predicted_value"]
        assert np.array_equal(out, big)
        client.stop_deployment(dep)
    big_raw, _ = raw_zmq(big.tobytes(), args.large_requests, 1)
    big_frames = encode_infer(1, {"deployment_id": "noop-large", "timeout_ms": 10000}, [{"input": big}])
    big_floor, _ = bare_relay(list(big_frames), args.large_requests, 1)
    large = [["raw pyzmq DEALER/ROUTER echo of the same 1 MiB (another process)", fmt(pct(big_raw, 50)),
              fmt(pct(big_raw, 99)), "1.0x"],
             ["floor: bare Python relay, ZeroMQ + stream hop, no work", fmt(pct(big_floor, 50)),
              fmt(pct(big_floor, 99)), f"{pct(big_floor, 50) / pct(big_raw, 50):.1f}x"],
             ["Client.infer, identity model, a 1 MiB float32 tensor in and out", fmt(pct(big_lat, 50)),
              fmt(pct(big_lat, 99)), f"{pct(big_lat, 50) / pct(big_raw, 50):.1f}x"]]
    print(table(f"Overhead: identity model, payload {len(payload)} bytes; {args.requests} sequential "
                f"requests, then {args.requests * 2} with {args.inflight} in flight from one client process",
                ["path", "p50 ms (1 in flight)", "p99 ms", f"req/s, {args.inflight} threads",
                 f"req/s, infer_many({args.inflight})", "p50 vs raw"], rows))
    print(table(f"A 1 MiB tensor round trip, {args.large_requests} sequential requests",
                ["path", "p50 ms", "p99 ms", "p50 vs raw"], large))


def latency(call, n: int) -> list[float]:
    for _ in range(min(20, n)):
        call()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t) * 1000)
    return lat


def mlfleet_dep(client, dep: str, x: np.ndarray, n: int, inflight: int) -> tuple[list[float], float, float]:
    docs = [{"input": x}]
    for _ in range(200):
        client.infer(dep, docs)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(dep, docs)
        lat.append((time.perf_counter() - t) * 1000)
    total = n * 2
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(inflight) as pool:
        list(pool.map(lambda _: client.infer(dep, docs), range(total)))
    threads_rps = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    results = client.infer_many(dep, [docs] * total, inflight=inflight)
    many_rps = total / (time.perf_counter() - t0)
    assert all(isinstance(r, dict) for r in results), [r for r in results if not isinstance(r, dict)][:3]
    return lat, threads_rps, many_rps


if __name__ == "__main__":
    main()

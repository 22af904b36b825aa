"""What a request's own work costs, against what 16 in flight at 25% of raw pyzmq leaves for it.

Measured in one run: the raw pyzmq round trip and the floor (a bare Python relay with the agent's
two hops, no work) at 16 in flight, with the CPU the floor's three processes use; then, warm and
in one process (no transport, caches hot), the work each part of mlfleet does per request: the
client's encode and decode, the agent's header decode and its deployment core (submit, dispatch
and answer in batches of 16), the worker's decode, model call (a TorchScript identity) and encode.

    .venv/bin/python -m bench.hotpath [--requests 20000]
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch

from bench._util import cluster, fmt, table
from bench.overhead import Identity, bare_relay, raw_zmq
from mlfleet.agent.tasks import PassThrough
from mlfleet.agent.worker import decode_jobs, encode_results, run_jobs
from mlfleet.common import messages as m
from mlfleet.common.client import _encode, _encode_payload, _results
from mlfleet.common.protocol import (
    decode_reply,
    decode_request,
    encode_infer,
    encode_payload,
    encode_reply_raw,
    encode_request,
)
from tests.helpers import save_model
from tests.test_runtime_core import Sim

DOCS = [{"input": np.ones((1, 16), np.float32)}]


def warm_us(f: Callable[[], Any], n: int) -> float:
    for _ in range(min(500, n)):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def with_cpu(run: Callable[[], Any]) -> tuple[Any, dict[float, float]]:
    """``run()``, sampling the CPU seconds of this process and its children every 20 ms."""
    me, samples, done = psutil.Process(), {}, threading.Event()

    def watch() -> None:
        while not done.is_set():
            total = 0.0
            for p in [me, *me.children(recursive=True)]:
                try:
                    ct = p.cpu_times()
                    total += ct.user + ct.system
                except psutil.Error:
                    pass
            samples[time.perf_counter()] = total
            done.wait(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        return run(), samples
    finally:
        done.set()
        th.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args()
    n = args.requests
    frames = encode_infer(1, {"deployment_id": "noop", "timeout_ms": 10000}, DOCS)
    payload = b"".join(bytes(f) for f in frames)
    _, raw_rps = raw_zmq(payload, 2000, 16)
    (_, floor_rps), samples = with_cpu(lambda: bare_relay(list(frames), n, 16))
    # the 16-in-flight phase is the run's last 2n requests: CPU over most of that window
    ts = sorted(samples)
    window = 0.8 * 2 * n / floor_rps
    start = max(t for t in ts if t <= ts[-1] - window)
    floor_cores = (samples[ts[-1]] - samples[start]) / (ts[-1] - start)
    floor_cpu_us = floor_cores / floor_rps * 1e6

    # mlfleet itself, 1 allocation, batches of up to 16, infer_many(16)
    with cluster(processors=2) as c, c.client() as client:
        client.put_model("noop", save_model(Identity(), c.workdir / "noop.pt"))
        client.start_deployment("noop", deployment_id="d", cache_size="0b", max_batch_size=16,
                                wait_for="fully_allocated")
        client.infer_many("d", [DOCS] * 2000, inflight=16)

        def many() -> float:
            t = time.perf_counter()
            client.infer_many("d", [DOCS] * (2 * n), inflight=16)
            return 2 * n / (time.perf_counter() - t)

        ml_rps, samples = with_cpu(many)
        ts = sorted(samples)
        ml_cores = (samples[ts[-1]] - samples[ts[0]]) / (ts[-1] - ts[0])
        client.stop_deployment("d")
    ml_cpu_us = ml_cores / ml_rps * 1e6

    # the work, warm, in this process
    def client_send() -> Any:
        return [_encode("infer", 7, {"deployment_id": "d", "timeout_ms": 10000}), *_encode_payload(DOCS)]

    reply = [encode_reply_raw(7, 200, b"\x80"), *encode_payload([{"predicted_value": DOCS[0]["input"]}])]

    def client_recv() -> Any:
        rep = decode_reply(reply[0])
        rep.payload.extend(reply[1:])
        return _results(rep)

    req = client_send()
    sim = Sim(max_batch_size=16, queue_capacity=1_000_000)
    wid = sim.start()[0]
    rids = itertools.count(1)

    def agent_core16() -> Any:
        core = sim.core
        for _ in range(16):
            core.submit(b"c", next(rids), (b"x",), 10.0, 0.0, key=None, dispatch=False, nbytes=0)
        core.dispatch(0.0)
        items = [{"rid": j, "status": 200, "docs": 1, "payload": (b"[1]",), "nbytes": 3}
                 for j in core.workers[wid].jobs]
        return core.worker_results(wid, items, 1.0, 0.0)

    task = PassThrough(torch.jit.script(Identity()))
    jobs = [{"rid": i, "frames": 1} for i in range(16)]
    header = decode_request(encode_request("infer", 0, {"jobs": jobs}))
    job_frames = [memoryview(bytes(encode_payload(DOCS)[0])) for _ in range(16)]

    def worker16() -> Any:
        with torch.inference_mode():
            return encode_results(run_jobs(task, decode_jobs(header, job_frames)), 0.1)

    parts = [("client: encode a request", warm_us(client_send, n)),
             ("client: decode its answer", warm_us(client_recv, n)),
             ("agent: decode the request header",
              warm_us(lambda: m.decode_infer(decode_request(req[0]).body), n)),
             ("agent: its deployment core (submit, dispatch, answer), per request in batches of 16",
              warm_us(agent_core16, max(1, n // 16)) / 16),
             ("worker: decode, run a TorchScript identity, encode, per request in batches of 16",
              warm_us(worker16, max(1, n // 16)) / 16)]
    work = sum(us for _, us in parts)
    target_rps = 0.25 * raw_rps
    allowed = 2 / target_rps * 1e6  # CPU a request may use with both cores busy all the time
    rows = [[name, fmt(us, 1)] for name, us in parts]
    rows += [["the work above, together (warm, no transport)", fmt(work, 1)],
             [f"the floor's transport: {floor_rps:.0f} req/s using {floor_cores:.2f} cores",
              fmt(floor_cpu_us, 1)],
             [f"25% of raw ({raw_rps:.0f} req/s): {target_rps:.0f} req/s allows, both cores always busy",
              fmt(allowed, 1)],
             ["left for the work after the floor's transport", fmt(allowed - floor_cpu_us, 1)],
             [f"the same at the floor's own use of the cores ({floor_cores / 2:.0%})",
              fmt(allowed * floor_cores / 2 - floor_cpu_us, 1)],
             [f"mlfleet, all its processes: {ml_rps:.0f} req/s ({ml_rps / raw_rps:.0%} of raw) using "
              f"{ml_cores:.2f} cores", fmt(ml_cpu_us, 1)],
             ["  of which its work, past the floor's transport (in place: after each switch)",
              fmt(ml_cpu_us - floor_cpu_us, 1)]]
    print(table("CPU per request at 16 in flight, microseconds", ["what", "us"], rows))


if __name__ == "__main__":
    main()

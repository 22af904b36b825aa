"""Liveness under bulk work: heartbeat replies from the coordinator and inference relays through an
agent, while a large model is put (uploaded, hashed, stored) and then fetched by the agent
(chunks read, written, verified). Baseline: the same measurements on the idle cluster, in the
same run.

    .venv/bin/python -m bench.liveness [--size 2gb]

The heartbeat probe is a second agent speaking the real agent protocol (register, then a
heartbeat every 50 ms) from this process; the relay probe is ``Client.infer`` on a tiny model
deployed on the real agent. Target: p99 under 100 ms for both while 2 GB move.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from bench._util import fmt, pct, table
from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import decode_reply, encode_request
from mlfleet.common.units import parse_bytes
from tests.helpers import Mlp, big_archive, running_cluster, save_model, wait_until


class HeartbeatProbe(threading.Thread):
    """A simulated agent: registers, then heartbeats every 50 ms; records each round trip."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip ms)
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        body = {"node_id": "probe", "hostname": "probe", "transport_address": "tcp://127.0.0.1:9",
                "allocated_processors": 1, "cpu": {"physical": 1, "logical": 1},
                "memory": {"total_bytes": 1 << 20, "available_bytes": 1 << 20}, "pid": os.getpid(),
                "deployments": []}
        rid = 0
        op = "register"
        while not self.stop.is_set():
            rid += 1
            msg = body if op == "register" else {"node_id": "probe", "memory": body["memory"],
                                                 "deployments": []}
            t0 = time.perf_counter()
            s.send(encode_request(op, rid, msg))
            while True:  # skip pushes (sync) and stale replies
                if not s.poll(30_000):
                    raise RuntimeError("no heartbeat reply in 30 s")
                try:
                    rep = decode_reply(s.recv())
                except ApiError:  # a push (sync), not a reply
                    continue
                if rep.id == rid:
                    break
            self.samples.append((t0, (time.perf_counter() - t0) * 1000))
            op = "heartbeat" if rep.status == 200 and not rep.body.get("reregister") else "register"
            self.stop.wait(0.05)
        s.close(0)
        ctx.term()


def relay_probe(client, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    x = [{"input": np.ones((1, 8), np.float32)}]
    while not stop.is_set():
        t0 = time.perf_counter()
        client.infer("probe", x)
        out.append((t0, (time.perf_counter() - t0) * 1000))
        stop.wait(0.02)


def phase(samples: list[tuple[float, float]], t0: float, t1: float) -> list[float]:
    return [ms for t, ms in samples if t0 <= t < t1] or [float("nan")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2gb")
    args = ap.parse_args()
    size = parse_bytes(args.size)
    with tempfile.TemporaryDirectory(prefix="mlfleet-bench-") as d:
        work = Path(d)
        archive = big_archive(work / "big.pt", size)
        with running_cluster(work, {"node-a": 2}) as c, c.client(request_timeout="600s") as client:
            client.put_model("probe", save_model(Mlp(), work / "mlp.pt"))
            client.start_deployment("probe", cache_size="0b", wait_for="fully_allocated")
            hb = HeartbeatProbe(c.coordinator.endpoint)
            hb.start()
            relay: list[tuple[float, float]] = []
            stop = threading.Event()
            with c.client() as probe_client:
                rt = threading.Thread(target=relay_probe, args=(probe_client, stop, relay), daemon=True)
                rt.start()
                t_idle = time.perf_counter()
                time.sleep(3)  # the idle baseline (a measurement window, not synchronisation)
                t_put = time.perf_counter()
                client.put_model("big", archive)
                t_fetch = time.perf_counter()
                client.start_deployment("big", wait_for="starting", cache_size="0b")
                node = "node-a"
                wait_until(lambda: (Path(c.workdir) / f"agent-{node}" / "models" /
                                    client.get_models("big")["trained_model_configs"][0]["sha256"]).exists(),
                           900, 0.2, what="the agent to fetch and verify the big model")
                t_done = time.perf_counter()
                stop.set()
                hb.stop.set()
                rt.join(30)
                hb.join(30)
            client.stop_deployment("big")
        rows = []
        for name, (a, b) in (("idle", (t_idle, t_put)), (f"put {args.size}", (t_put, t_fetch)),
                             (f"fetch {args.size}", (t_fetch, t_done))):
            h, r = phase(hb.samples, a, b), phase(relay, a, b)
            rows.append([name, f"{b - a:.1f}", len(h), fmt(pct(h, 50)), fmt(pct(h, 99)), fmt(max(h)),
                         len(r), fmt(pct(r, 50)), fmt(pct(r, 99)), fmt(max(r))])
        print(table(f"Liveness while a {args.size} model is put and fetched (heartbeat every 50 ms; "
                    "inference relay every 20 ms)",
                    ["phase", "seconds", "heartbeats", "hb p50 ms", "hb p99 ms", "hb max ms",
                     "inferences", "relay p50 ms", "relay p99 ms", "relay max ms"], rows))


if __name__ == "__main__":
    main()

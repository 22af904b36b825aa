"""One real agent with many deployments: its heartbeats and its inference relay.

    .venv/bin/python -m bench.agent_scale [--deployments 100]

A real coordinator and one real agent (``--allocated-processors`` = deployments), with a tiny
TorchScript model (an 8 -> 8 MLP) deployed ``--deployments`` times (1 allocation, 1 thread
each: one model host and one worker process per deployment). Between the agent and the
coordinator sits a ZeroMQ proxy in this process (a ROUTER for the agent, a DEALER to the
coordinator for each of the agent's connections, frames passed on unchanged) that times each
``heartbeat`` from the agent to its reply: the round trip as the agent's side sees it, and the
interval between heartbeats (the agent sends one a second; a loop that falls behind shows as
longer intervals). The relay probe is
``Client.infer`` every 20 ms on one deployment picked at random each time. The model is uploaded
with its warm-up input (``--cold``: without), so each allocation is warm before it is routed to.

Phases, in one run: the agent with 1 deployment (the baseline), then with all of them, each for
``--window`` seconds. The proxy's own cost is in both. Before each start the benchmark checks
the machine's available memory and stops adding deployments below ``--min-free`` (the machine
is shared), saying so.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from bench._util import fmt, pct, table
from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import encode_array, peek_request, unpack
from mlfleet.common.units import parse_bytes
from tests.helpers import Cluster, Mlp, save_model


class HeartbeatProxy(threading.Thread):
    """agent DEALERs -> our ROUTER -> one DEALER each -> the coordinator's ROUTER, and back. One
    agent, whose connections (main and bulk) stay apart on the way to the coordinator."""

    def __init__(self, coordinator: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.coordinator = coordinator
        self.backs: dict[bytes, zmq.Socket] = {}  # the agent's connection -> ours to the coordinator
        self.conn_of: dict[zmq.Socket, bytes] = {}
        self.sent: dict[int, float] = {}                 # heartbeat id -> when it passed
        self.samples: list[tuple[float, float]] = []     # (sent at, round trip ms)
        self.intervals: list[tuple[float, float]] = []   # (sent at, seconds since the last one)
        self.last = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(100):
                if sock is self.front:
                    ident, frame = self.front.recv_multipart()
                    back = self.backs.get(ident)
                    if back is None:
                        back = self.backs[ident] = self.ctx.socket(zmq.DEALER)
                        back.setsockopt(zmq.LINGER, 0)
                        back.connect(self.coordinator)
                        self.conn_of[back] = ident
                        poller.register(back, zmq.POLLIN)
                    now = time.perf_counter()
                    try:
                        op, rid = peek_request(frame)
                    except Exception:
                        op, rid = "", 0
                    if op == "heartbeat":
                        self.sent[rid] = now
                        if self.last:
                            self.intervals.append((now, now - self.last))
                        self.last = now
                    back.send(frame)
                else:
                    frame = sock.recv()
                    now = time.perf_counter()
                    try:
                        msg = unpack(frame)
                        rid = msg.get("id") if "status" in msg else None
                    except Exception:
                        rid = None
                    t0 = self.sent.pop(rid, None) if isinstance(rid, int) else None
                    if t0 is not None:
                        self.samples.append((t0, (now - t0) * 1000))
                    self.front.send_multipart([self.conn_of[sock], frame])
        self.front.close(0)
        for back in self.backs.values():
            back.close(0)
        self.ctx.term()


def relay_probe(client: Any, deps: list[str], stop: threading.Event, out: list[tuple[float, float]],
                errors: list[str]) -> None:
    x = [{"input": np.ones((1, 8), np.float32)}]
    rnd = random.Random(0)
    while not stop.is_set():
        dep = rnd.choice(deps)
        t0 = time.perf_counter()
        try:
            client.infer(dep, x)
            out.append((t0, (time.perf_counter() - t0) * 1000))
        except Exception as e:  # counted, shown; the probe goes on
            errors.append(f"{dep}: {type(e).__name__}: {e}"[:200])
        stop.wait(0.02)


def phase(samples: list[tuple[float, float]], t0: float, t1: float) -> list[float]:
    return [v for t, v in samples if t0 <= t < t1] or [float("nan")]


def tree_rss_mib(pid: int) -> float:
    p = psutil.Process(pid)
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_full_info().uss
        except psutil.Error:
            pass
    return total / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deployments", type=int, default=100)
    ap.add_argument("--window", type=float, default=15.0, help="seconds each phase is measured")
    ap.add_argument("--min-free", default="2gb", help="stop adding deployments below this much "
                    "available memory")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds for the whole run")
    ap.add_argument("--cold", action="store_true",
                    help="upload the model without a warm-up input (each allocation's first request "
                         "then runs TorchScript's profiling pass)")
    args = ap.parse_args()
    end = time.monotonic() + args.budget
    min_free = parse_bytes(args.min_free)
    print(f"load average at start: {psutil.getloadavg()}, {psutil.cpu_count()} CPUs", file=sys.stderr)
    rows: list[list[Any]] = []
    note = ""
    with tempfile.TemporaryDirectory(prefix="mlfleet-agent-scale-") as d:
        work = Path(d)
        c = Cluster(work)
        proxy = None
        try:
            c.start_coordinator(extra=["--heartbeat-interval", "1s", "--node-timeout", "10s"])
            proxy = HeartbeatProxy(c.coordinator.endpoint)
            proxy.start()
            real = c.coordinator.endpoint  # the helper's agent, pointed at the proxy
            c.coordinator.endpoint = proxy.endpoint
            agent = c.start_agent("node-a", args.deployments)
            c.coordinator.endpoint = real
            c.wait_nodes(1, 60)
            with c.client(request_timeout="300s") as client:
                # with its warm-up input, as a TorchScript pass_through model needs for warm
                # allocations (docs/formats.md): without one, each allocation's first request
                # runs TorchScript's profiling pass (about 30 ms for this model)
                warm = {"example_input": encode_array(np.ones((1, 8), np.float32))}
                client.put_model("tiny", save_model(Mlp(), work / "mlp.pt"),
                                 model_config=None if args.cold else warm)
                deps: list[str] = []

                def add(n: int) -> None:
                    nonlocal note
                    while len(deps) < n:
                        if time.monotonic() > end - 3 * args.window - 30:
                            note = f"the time budget ran out at {len(deps)} deployments"
                            return
                        free = psutil.virtual_memory().available
                        if free < min_free:
                            note = (f"stopped at {len(deps)} deployments: {free >> 20} MiB available, "
                                    f"below --min-free {args.min_free}")
                            return
                        dep = f"tiny-{len(deps):03d}"
                        try:
                            client.start_deployment("tiny", deployment_id=dep, cache_size="0b",
                                                    wait_for="fully_allocated", timeout="120s")
                        except ApiError as e:  # e.g. the planner's memory estimate: said, not hidden
                            note = f"stopped at {len(deps)} deployments: {e.status} {e}"[:300]
                            return
                        deps.append(dep)

                def measure(name: str) -> None:
                    relay: list[tuple[float, float]] = []
                    errors: list[str] = []
                    stop = threading.Event()
                    with c.client() as probe:
                        t = threading.Thread(target=relay_probe, daemon=True,
                                             args=(probe, list(deps), stop, relay, errors))
                        time.sleep(2)  # the last syncs land before the window opens
                        t0 = time.perf_counter()
                        t.start()
                        time.sleep(args.window)  # the measurement window
                        t1 = time.perf_counter()
                        stop.set()
                        t.join(30)
                    hb = phase(proxy.samples, t0, t1)
                    iv = phase(proxy.intervals, t0, t1)
                    r = phase(relay, t0, t1)
                    rows.append([name, len(deps), len(hb), fmt(pct(hb, 50)), fmt(pct(hb, 99)), fmt(max(hb)),
                                 fmt(max(iv), 2), len(r), fmt(pct(r, 50)), fmt(pct(r, 99)), fmt(max(r)),
                                 len(errors), fmt(tree_rss_mib(agent.pid), 0)])
                    if errors:
                        print(f"  {name}: {len(errors)} inference errors, first: {errors[0]}",
                              file=sys.stderr)

                t = time.monotonic()
                add(1)
                print(f"  1 deployment in {time.monotonic() - t:.1f}s", file=sys.stderr)
                measure("baseline: 1 deployment")
                t = time.monotonic()
                add(args.deployments)
                print(f"  {len(deps)} deployments in {time.monotonic() - t:.1f}s", file=sys.stderr)
                measure(f"{len(deps)} deployments")
        finally:
            if proxy is not None:
                proxy.stop.set()
            leftovers = c.shutdown()
            if proxy is not None:
                proxy.join(10)
            assert not leftovers, f"processes outlived their daemons: {leftovers}"
    print(table(f"One agent with many deployments of a tiny model (heartbeat every 1 s through a timing "
                f"proxy; inference every 20 ms on a random deployment; windows of {args.window:.0f} s)",
                ["phase", "deployments", "heartbeats", "hb p50 ms", "hb p99 ms", "hb max ms",
                 "longest hb interval s", "inferences", "relay p50 ms", "relay p99 ms", "relay max ms",
                 "errors", "agent tree USS MiB"], rows))
    if note:
        print(note)


if __name__ == "__main__":
    main()

"""The coordinator at scale: a real coordinator driven by many simulated agents.

    .venv/bin/python -m bench.scale [--sizes 100x50,300x150,1000x500,3000x1000]

For each (nodes, deployments): a real coordinator (``--heartbeat-interval 1s --node-timeout
10s``) and one simulator process (``bench/_scale_agents.py``: one DEALER per node speaking the
real agent protocol; each node registers with 8 processors and 64 GiB, heartbeats every second
and reports what its last sync assigned it as started). The benchmark process uploads a tiny
TorchScript model with ``mlfleet.Client``, starts the deployments (1 allocation each,
``wait_for=starting``), waits until all are fully allocated, then measures:

* coordinator CPU (psutil cpu_times over a steady window, % of one core) and RSS;
* heartbeat round trips p50/p99 in that window (as the simulated agents see them);
* one more start with ``wait_for=started`` and one with ``wait_for=fully_allocated``;
* ``get_routing``, ``get_stats`` of one deployment and of all: latency;
* nodes falsely declared lost (``lost:`` lines in the coordinator's log; every node is alive);
* liveness under bulk work: a model of ``--fetch-size`` is put, then fetched by ``--fetchers``
  nodes at once (4 MiB chunks, 4 in flight each, on each fetcher's bulk connection unless
  ``--chunks-on-main``) while every node heartbeats; heartbeat p99 during the upload and during
  the fetch: of every simulated node, of the fetchers themselves (heartbeats sent while their
  fetch was under way), and of witness nodes in a process of their own.

Every wait has a deadline, each size a budget (``--size-budget``); a size that does not finish
is reported with the reason and larger sizes are skipped. Only loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from bench._util import fmt, pct, table
from mlfleet.common.units import parse_bytes
from tests.helpers import ROOT, Cluster, big_archive, save_model, wait_until

COORDINATOR_ARGS = ["--heartbeat-interval", "1s", "--node-timeout", "10s"]
LOST = "lost: no heartbeat"


class OutOfBudget(Exception):
    pass


class SimExited(BaseException):
    """A simulator process ended: not retried by ``wait_until`` (which retries Exceptions)."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, want: float) -> float:
        left = self.end - time.monotonic()
        if left <= 1:
            raise OutOfBudget("its time budget ran out")
        return min(want, left)


class SimProcess:
    """The simulated agents, in their own process (its CPU is not the benchmark's)."""

    def __init__(self, endpoint: str, nodes: int, processors: int, out: Path, max_s: float,
                 prefix: str = "sim", chunks_on_main: bool = False) -> None:
        self.out, self.prefix = out, prefix
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._scale_agents", "--endpoint", endpoint, "--nodes", str(nodes),
             "--processors", str(processors), "--out", str(out), "--max-seconds", str(max_s),
             "--prefix", prefix, *(["--chunks-on-main"] if chunks_on_main else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)

    def ask(self, cmd: str, timeout_s: float = 60) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write((json.dumps({"cmd": cmd}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError(f"the simulator did not answer [{cmd}] in {timeout_s}s")
        line = self.proc.stdout.readline()
        if not line:
            raise SimExited(f"the simulator exited ({self.proc.poll()}); see its stderr above")
        return json.loads(line)

    def samples(self) -> dict[str, list[list[float]]]:
        self.ask("dump", 120)
        return json.loads((self.out / f"{self.prefix}-samples.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("stop", 10)
                self.proc.wait(20)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()  # by its pid, which we started
                self.proc.wait()


def in_window(samples: list[list[float]], t0: float, t1: float, fetching: int | None = None) -> list[float]:
    """Round trips sent in [t0, t1); ``fetching`` 1 (0): only those a node sent while it was
    (was not) fetching a model."""
    return [x[1] for x in samples if t0 <= x[0] < t1 and (fetching is None or x[2:] == [fetching])] \
        or [float("nan")]


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def lost_lines(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if LOST in line)


def all_fully_allocated(client: Any, ids: set[str] | None = None) -> bool:
    stats = client.get_stats()["trained_model_stats"]
    states = {s["deployment_stats"]["deployment_id"]: s["deployment_stats"]["allocation_status"]["state"]
              for s in stats}
    return all(states.get(i) == "fully_allocated" for i in (ids or states))


def fully_allocated(client: Any, dep: str) -> bool:
    s = client.get_stats(dep)["trained_model_stats"][0]
    return s["deployment_stats"]["allocation_status"]["state"] == "fully_allocated"


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def run_size(r: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Fills ``r`` as it goes, so a size that runs out of time still shows how far it got."""
    budget = Budget(args.size_budget)
    nodes, deps = r["nodes"], r["deployments"]
    c = Cluster(work)
    sim: SimProcess | None = None
    wit: SimProcess | None = None
    try:
        coord = c.start_coordinator(extra=[*COORDINATOR_ARGS,
                                           "--bulk-max-bytes-per-sec", args.bulk_max_bytes_per_sec])
        cp = psutil.Process(coord.pid)
        log = coord.log
        t0 = time.monotonic()
        sim = SimProcess(coord.endpoint, nodes, args.processors, work, args.size_budget + 60,
                         chunks_on_main=args.chunks_on_main)
        # a few more nodes in a process of their own, with 1 processor (never given the big
        # model): their heartbeat round trips are the coordinator's, not the fetchers' receiving
        wit = SimProcess(coord.endpoint, args.witnesses, 1, work, args.size_budget + 60, "witness") \
            if args.witnesses else None
        st = wait_until(lambda: (s := sim.ask("status"))["registered"] >= nodes and s,
                        budget.left(600), 0.5, what=f"{nodes} simulated nodes to register")
        if wit is not None:
            wait_until(lambda: wit.ask("status")["registered"] >= args.witnesses, budget.left(120), 0.5,
                       what=f"{args.witnesses} witness nodes to register")
        with c.client(request_timeout="300s") as client:
            wait_until(lambda: len(client.get_nodes()["nodes"]) >= nodes + args.witnesses,
                       budget.left(120), 0.5, what=f"the coordinator to list {nodes} nodes")
            r["register_s"] = time.monotonic() - t0
            progress(f"{nodes} nodes registered in {r['register_s']:.1f}s ({st})")

            client.put_model("tiny", save_model(torch.nn.Linear(2, 2), work / "tiny.pt"))
            t0 = time.monotonic()
            starts = []
            for i in range(deps):
                budget.left(1)
                a = time.perf_counter()
                client.start_deployment("tiny", deployment_id=f"dep-{i:04d}", number_of_allocations=1,
                                        wait_for="starting", timeout="120s")
                starts.append((time.perf_counter() - a) * 1000)
                r["started"] = i + 1
            r["start_all_s"] = time.monotonic() - t0
            r["start_p50"], r["start_p99"] = pct(starts, 50), pct(starts, 99)
            wait_until(lambda: all_fully_allocated(client), budget.left(600), 1.0,
                       what=f"{deps} deployments to be fully allocated")
            r["allocated_s"] = time.monotonic() - t0
            progress(f"{deps} deployments started in {r['start_all_s']:.1f}s, all fully allocated "
                     f"after {r['allocated_s']:.1f}s")

            time.sleep(min(3.0, budget.left(3)))  # let the last syncs and heartbeats land
            lost0 = lost_lines(log)
            budget.left(args.window + 5)
            w0, c0, s0 = time.monotonic(), cpu_s(cp), cpu_s(sim.ps)
            time.sleep(args.window)  # the steady window: a measurement, not synchronisation
            w1, c1, s1 = time.monotonic(), cpu_s(cp), cpu_s(sim.ps)
            r["cpu_pct"] = 100 * (c1 - c0) / (w1 - w0)
            r["sim_cpu_pct"] = 100 * (s1 - s0) / (w1 - w0)
            r["rss_mib"] = cp.memory_info().rss / (1 << 20)
            r["lost_steady"] = lost_lines(log) - lost0
            progress(f"steady: coordinator {r['cpu_pct']:.0f}% CPU, simulator {r['sim_cpu_pct']:.0f}%")

            ids = [f"dep-{i:04d}" for i in range(deps)]
            rnd = random.Random(0)
            routing = timed(lambda _: client.get_routing(rnd.choice(ids)), args.probes)
            stats1 = timed(lambda _: client.get_stats(rnd.choice(ids)), args.probes)
            stats_all = timed(lambda _: client.get_stats(), 3)
            r["routing"] = (pct(routing, 50), pct(routing, 99))
            r["stats1"] = (pct(stats1, 50), pct(stats1, 99))
            r["stats_all"] = pct(stats_all, 50)
            budget.left(60)
            a = time.perf_counter()
            client.start_deployment("tiny", deployment_id="one-more-started", number_of_allocations=1,
                                    wait_for="started", timeout="120s")
            r["one_started_s"] = time.perf_counter() - a
            a = time.perf_counter()
            client.start_deployment("tiny", deployment_id="one-more-full", number_of_allocations=1,
                                    wait_for="fully_allocated", timeout="120s")
            r["one_full_s"] = time.perf_counter() - a
            progress(f"one more start: {r['one_started_s']:.3f}s (started), "
                     f"{r['one_full_s']:.3f}s (fully_allocated)")

            # liveness under bulk work: one model put, then fetched by many nodes at once
            size = parse_bytes(args.fetch_size)
            archive = big_archive(work / "big.pt", size)
            free = [n for n, b in client.get_nodes()["nodes"].items()
                    if not b["deployments"] and n.startswith("sim-")]
            fetchers = min(args.fetchers, len(free))
            r["fetchers"] = fetchers
            budget.left(120)
            p0 = time.monotonic()
            client.put_model("big", archive)
            p1 = time.monotonic()
            lost1 = lost_lines(log)
            client.start_deployment("big", deployment_id="big", number_of_allocations=fetchers,
                                    threads_per_allocation=args.processors, wait_for="starting",
                                    timeout="120s")
            wait_until(lambda: fully_allocated(client, "big"), budget.left(600), 0.5,
                       what=f"{fetchers} nodes to fetch the {args.fetch_size} model")
            f1 = time.monotonic()
            r["lost_fetch"] = lost_lines(log) - lost1
            r["put_s"], r["fetch_s"] = p1 - p0, f1 - p1
            progress(f"{fetchers} nodes fetched {args.fetch_size} in {r['fetch_s']:.1f}s")
            r["lost_total"] = lost_lines(log)
        samples = sim.samples()
        st = sim.ask("status")
        r["sim"] = st
        hb = samples["hb"]
        whb = wit.samples()["hb"] if wit is not None else []
        for name, (a, b) in (("steady", (w0, w1)), ("put", (p0, p1)), ("fetch", (p1, f1))):
            h = in_window(hb, a, b)
            r[f"hb_{name}"] = (pct(h, 50), pct(h, 99), max(h), len(h))
            h = in_window(whb, a, b)
            r[f"wit_{name}"] = (pct(h, 50), pct(h, 99), max(h), len(h))
        h = in_window(hb, p1, f1, fetching=1)
        r["fetchers_fetch"] = (pct(h, 50), pct(h, 99), max(h), len(h))
        h = in_window(hb, p1, f1, fetching=0)  # the other nodes of the fetchers' process
        r["others_fetch"] = (pct(h, 50), pct(h, 99), max(h), len(h))
        return r
    finally:
        if c.coordinator is not None:
            r["lost_total"] = lost_lines(c.coordinator.log)
            with contextlib.suppress(psutil.Error):
                r.setdefault("rss_mib", psutil.Process(c.coordinator.pid).memory_info().rss / (1 << 20))
        for p in (sim, wit):
            if p is not None:
                p.stop()
        leftovers = c.shutdown()
        assert not leftovers, f"processes outlived their daemons: {leftovers}"


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ms(x: float) -> str:
    return fmt(x, 1) if x >= 10 else fmt(x, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100x50,300x150,1000x500,3000x1000",
                    help="NODESxDEPLOYMENTS, comma separated")
    ap.add_argument("--processors", type=int, default=8, help="allocated processors per node")
    ap.add_argument("--window", type=float, default=15.0, help="steady window, seconds")
    ap.add_argument("--probes", type=int, default=50, help="get_routing / get_stats calls each")
    ap.add_argument("--fetch-size", default="32mb")
    ap.add_argument("--fetchers", type=int, default=50)
    ap.add_argument("--witnesses", type=int, default=10,
                    help="nodes in a process of their own whose heartbeats measure the coordinator alone")
    ap.add_argument("--size-budget", type=float, default=900.0, help="seconds for one size")
    ap.add_argument("--chunks-on-main", action="store_true",
                    help="simulated agents ask for model chunks on their main connection (as before "
                         "agents had a bulk connection): for comparison")
    ap.add_argument("--bulk-max-bytes-per-sec", default="0b",
                    help="the coordinator's cap on model bytes sent per second (0b: none)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", file=sys.stderr)
    results: list[dict[str, Any]] = []
    failed = ""
    for nodes, deps in sizes:
        if failed:
            results.append({"nodes": nodes, "deployments": deps,
                            "error": f"not run: {failed}"})
            continue
        progress(f"--- {nodes} nodes, {deps} deployments")
        with tempfile.TemporaryDirectory(prefix="mlfleet-scale-") as d:
            r: dict[str, Any] = {"nodes": nodes, "deployments": deps}
            try:
                results.append(run_size(r, args, Path(d)))
            except (OutOfBudget, AssertionError, RuntimeError, SimExited) as e:
                reason = (f"did not finish within {args.size_budget:.0f}s ({e}); by then "
                          f"{r.get('started', 0)} deployments started, coordinator RSS "
                          f"{r.get('rss_mib', 0):.0f} MiB, {r.get('lost_total', '?')} nodes lost")
                progress(reason)
                results.append({**r, "error": reason})
                failed = f"{nodes}x{deps} did not finish"
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    rows, frows = [], []
    for r in results:
        if "error" in r:
            rows.append([r["nodes"], r["deployments"], r["error"], *["-"] * 13])
            continue
        rows.append([r["nodes"], r["deployments"], fmt(r["register_s"], 1),
                     f"{fmt(r['start_all_s'], 1)} ({ms(r['start_p99'])})", fmt(r["allocated_s"], 1),
                     fmt(r["cpu_pct"], 0), fmt(r["rss_mib"], 0),
                     ms(r["hb_steady"][0]), ms(r["hb_steady"][1]),
                     fmt(r["one_started_s"], 3), fmt(r["one_full_s"], 3),
                     f"{ms(r['routing'][0])} / {ms(r['routing'][1])}",
                     f"{ms(r['stats1'][0])} / {ms(r['stats1'][1])}", ms(r["stats_all"]),
                     r["lost_total"], fmt(r["sim_cpu_pct"], 0)])
        frows.append([r["nodes"], f"{r['fetchers']} x {args.fetch_size}", fmt(r["put_s"], 1),
                      ms(r["hb_put"][1]), fmt(r["fetch_s"], 1), ms(r["hb_fetch"][0]),
                      ms(r["hb_fetch"][1]), ms(r["hb_fetch"][2]), ms(r["hb_steady"][1]),
                      f"{ms(r['wit_put'][1])} / {ms(r['wit_fetch'][1])} / {ms(r['wit_fetch'][2])}",
                      f"{ms(r['fetchers_fetch'][0])} / {ms(r['fetchers_fetch'][1])} / "
                      f"{ms(r['fetchers_fetch'][2])} ({r['fetchers_fetch'][3]})",
                      f"{ms(r['others_fetch'][0])} / {ms(r['others_fetch'][1])}",
                      r["lost_fetch"]])
    print(table("The coordinator at scale (heartbeat every 1 s, node timeout 10 s; steady window "
                f"{args.window:.0f} s)",
                ["nodes", "deployments", "register all s", "start all s (p99 one, ms)",
                 "all fully allocated s", "coord CPU %", "coord RSS MiB", "hb p50 ms", "hb p99 ms",
                 "+1 start, started s", "+1 start, fully_allocated s", "get_routing p50/p99 ms",
                 "get_stats(one) p50/p99 ms", "get_stats(all) ms", "nodes lost", "simulator CPU %"],
                rows))
    if frows:
        where = "the main connection" if args.chunks_on_main else "a bulk connection of their own"
        print(table("Liveness while many nodes fetch one model at once (4 MiB chunks, 4 in flight each, "
                    f"on {where})",
                    ["nodes", "fetchers x size", "put s", "hb p99 ms (put)", "fetch s",
                     "hb p50 ms (fetch)", "hb p99 ms (fetch)", "hb max ms (fetch)",
                     "hb p99 ms (steady)", "witness hb p99 put / p99 fetch / max fetch ms",
                     "fetchers' own hb p50 / p99 / max ms (n)",
                     "same process, not fetching: hb p50 / p99 ms", "nodes lost (fetch)"], frows))


if __name__ == "__main__":
    main()

"""Helpers for the chaos test (tests/test_chaos.py): a cluster whose daemons can be SIGKILLed and
restarted in place, a recorder of inference requests, and the process-tree bookkeeping the
invariants need. Everything is ended by pid."""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psutil

from tests.helpers import Cluster, Daemon, wait_until

WORKER_READY = re.compile(rb"deployment \[([^\]]+)\] on node \[([^\]]+)\]: allocation worker \S+ ready "
                          rb"\(pid (\d+)\)")
BAD_LOG = (b"Traceback", b"internal error", b"failed; carrying on")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"


class ChaosCluster:
    """A coordinator (restartable on the address it first got) and agents (restartable with the
    same node id and data dir). Daemons that were killed go to ``cluster.retired`` so the final
    shutdown still checks that none of their descendants outlived them."""

    def __init__(self, workdir: Path, nodes: dict[str, int], agent_extra: list[str],
                 coordinator_extra: list[str] | None = None) -> None:
        self.c = Cluster(workdir)
        self.workdir = workdir
        self.nodes = nodes
        self.agent_extra = agent_extra
        self.coordinator_extra = coordinator_extra or []
        self.endpoint = ""
        self.restarts = {"coordinator": 0, **{n: 0 for n in nodes}}

    def start(self) -> None:
        d = self.c.start_coordinator(extra=self.coordinator_extra)
        self.endpoint = d.endpoint  # tcp://127.0.0.1:PORT: kept for every restart
        for node, procs in self.nodes.items():
            self.c.start_agent(node, procs, self.agent_extra)
        self.c.wait_nodes(len(self.nodes))

    @property
    def coordinator(self) -> Daemon:
        assert self.c.coordinator is not None
        return self.c.coordinator

    def agent(self, node: str) -> Daemon:
        return self.c.agents[node]

    def daemons(self) -> list[Daemon]:
        return [self.coordinator, *self.c.agents.values()]

    def dead_daemons(self) -> list[str]:
        """Daemons expected alive that are not, each with its exit code and log tail."""
        out = []
        for d in self.daemons():
            if d.proc.poll() is not None:
                out.append(f"{d.name} (pid {d.pid}) exited with {d.proc.returncode}; "
                           f"log tail:\n{tail(d.log)}")
        return out

    def kill_coordinator(self) -> None:
        d = self.coordinator
        d.stop(sig=signal.SIGKILL)
        self.c.retired.append(d)
        self.c.coordinator = None

    def restart_coordinator(self) -> Daemon:
        self.restarts["coordinator"] += 1
        return self.c.start_coordinator(listen=self.endpoint, extra=self.coordinator_extra)

    def kill_agent(self, node: str) -> set[int]:
        """SIGKILL an agent; returns the pids of its model hosts and workers at that moment."""
        d = self.c.agents.pop(node)
        procs = {p.pid for p in d.children()}
        d.stop(sig=signal.SIGKILL)
        self.c.retired.append(d)
        return procs

    def restart_agent(self, node: str) -> Daemon:
        self.restarts[node] += 1
        return self.c.start_agent(node, self.nodes[node], self.agent_extra)

    # ---- process tree ---------------------------------------------------------------------------
    def tree(self) -> dict[str, dict[int, list[int]]]:
        """node -> {model host pid: [its worker pids]} for every live process under the agents."""
        out: dict[str, dict[int, list[int]]] = {}
        for node, d in self.c.agents.items():
            hosts: dict[int, list[int]] = {}
            try:
                for h in psutil.Process(d.pid).children():
                    if h.status() == psutil.STATUS_ZOMBIE:
                        continue
                    hosts[h.pid] = [w.pid for w in h.children() if w.status() != psutil.STATUS_ZOMBIE]
            except psutil.NoSuchProcess:
                pass
            out[node] = hosts
        return out

    def worker_owners(self) -> dict[int, tuple[str, str]]:
        """worker pid -> (deployment id, node id), from the agents' 'worker ready' log lines."""
        owners: dict[int, tuple[str, str]] = {}
        for node in self.nodes:
            log = self.workdir / f"{node}.log"
            try:
                data = log.read_bytes()
            except OSError:
                continue
            for m in WORKER_READY.finditer(data):
                owners[int(m.group(3))] = (m.group(1).decode(), m.group(2).decode())
        return owners

    def bad_log_lines(self) -> list[str]:
        """Lines of any daemon log that show a fault caught inside a daemon (a traceback, an
        internal error): each one is a bug even if the daemon carried on."""
        out = []
        for log in sorted(self.workdir.glob("*.log")):
            lines = log.read_bytes().splitlines()
            for i, line in enumerate(lines):
                if any(b in line for b in BAD_LOG):
                    ctx = b"\n".join(lines[max(0, i - 3): i + 12]).decode(errors="replace")
                    out.append(f"{log.name}:{i + 1}:\n{ctx}")
        return out

    def shutdown(self) -> list[int]:
        return self.c.shutdown()


# ---- inference load -------------------------------------------------------------------------

@dataclass
class Req:
    dep: str
    t0: float
    timeout_s: float
    step: int
    t1: Optional[float] = None
    outcome: Any = None   # True, or the exception raised

    def late_by(self, now: float, margin_s: float) -> float:
        """Seconds past deadline + margin (> 0: a broken promise), answered or not."""
        end = self.t1 if self.t1 is not None else now
        return end - (self.t0 + self.timeout_s + margin_s)


@dataclass
class Load:
    """Background threads each sending a bounded number of requests, one at a time, every
    request recorded with when it started, its deadline and its outcome."""
    client: Any
    records: list[Req] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, dep: str, doc_fn, n: int, timeout_s: float, step: int, seed: int) -> None:
        rng = np.random.default_rng(seed)

        def run() -> None:
            for _ in range(n):
                r = Req(dep, time.monotonic(), timeout_s, step)
                with self.lock:
                    self.records.append(r)
                try:
                    self.client.infer(dep, doc_fn(rng), timeout=timeout_s)
                    r.outcome = True
                except Exception as e:  # noqa: BLE001 - recorded, judged by the invariants
                    r.outcome = e
                r.t1 = time.monotonic()

        t = threading.Thread(target=run, name=f"load-{dep}-{step}", daemon=True)
        self.threads = [x for x in self.threads if x.is_alive()]
        self.threads.append(t)
        t.start()

    def running(self) -> int:
        return sum(1 for t in self.threads if t.is_alive())

    def snapshot(self) -> list[Req]:
        with self.lock:
            return list(self.records)

    def join(self, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]


def wait_gone(pids: set[int], timeout_s: float, what: str) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), timeout_s, what=what)

"""Real daemons for tests: processes on loopback, ports chosen by the OS, ended by pid."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--heartbeat-interval", "200ms", "--node-timeout", "3s"]


def wait_until(cond: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05,
               what: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    endpoint: str
    log: Path
    descendants: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def remember_children(self) -> None:
        self.descendants |= {p.pid for p in self.children()}

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> int:
        self.remember_children()
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill_leftovers(self) -> list[int]:
        """SIGKILL any descendant still alive (by pid); returns the ones that were."""
        left = []
        for pid in self.descendants:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        return left


def start_daemon(kind: str, args: list[str], workdir: Path, name: str) -> Daemon:
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlfleet", kind, *args,
                                 "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)
    def ready_now():
        if proc.poll() is not None:
            return {"exited": proc.returncode}
        return ready.exists() and json.loads(ready.read_text())
    info = wait_until(ready_now, 60, what=f"{name} to be ready")
    if "exited" in info:
        raise RuntimeError(f"{name} exited with {info['exited']}: {log.read_text()[-3000:]}")
    assert info["pid"] == proc.pid
    return Daemon(name, proc, info["endpoint"], log)


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.coordinator: Daemon | None = None
        self.agents: dict[str, Daemon] = {}
        self.retired: list[Daemon] = []

    def start_coordinator(self, listen: str = "tcp://127.0.0.1:0", extra: list[str] | None = None) -> Daemon:
        self.coordinator = start_daemon("coordinator", ["--listen", listen, "--data-dir",
                                                        str(self.workdir / "coordinator"), *FAST,
                                                        *(extra or [])], self.workdir, "coordinator")
        return self.coordinator

    def start_agent(self, node_id: str, processors: int = 4, extra: list[str] | None = None) -> Daemon:
        assert self.coordinator is not None
        d = start_daemon("agent", ["--coordinator", self.coordinator.endpoint, "--node-id", node_id,
                                   "--allocated-processors", str(processors), "--data-dir",
                                   str(self.workdir / f"agent-{node_id}"), *(extra or [])],
                         self.workdir, node_id)
        self.agents[node_id] = d
        return d

    def client(self, **kw):
        from mlfleet.common.client import Client
        kw.setdefault("request_timeout", "20s")
        return Client(self.coordinator.endpoint, **kw)

    def wait_nodes(self, n: int, timeout_s: float = 30.0) -> None:
        with self.client() as c:
            wait_until(lambda: len(c.get_nodes()["nodes"]) == n, timeout_s, what=f"{n} nodes")

    def worker_pids(self, node_id: str) -> list[int]:
        """Processes under an agent (model hosts and their allocation workers)."""
        return [p.pid for p in self.agents[node_id].children()]

    def shutdown(self) -> list[int]:
        leftovers = []
        daemons = [*self.agents.values(), *([self.coordinator] if self.coordinator else []), *self.retired]
        for d in daemons:
            d.stop()
        for d in daemons:
            leftovers += d.kill_leftovers()
        return leftovers


@contextlib.contextmanager
def running_cluster(workdir: Path, nodes: dict[str, int] | None = None,
                    coordinator_extra: list[str] | None = None,
                    agent_extra: list[str] | None = None) -> Iterator[Cluster]:
    """A coordinator and agents (node id -> allocated processors), all ended by pid on exit;
    fails if any process outlived its daemon."""
    c = Cluster(workdir)
    try:
        c.start_coordinator(extra=coordinator_extra)
        for node_id, processors in (nodes if nodes is not None else {"node-a": 2}).items():
            c.start_agent(node_id, processors, agent_extra)
        if c.agents:
            c.wait_nodes(len(c.agents))
        yield c
    finally:
        leftovers = c.shutdown()
        assert not leftovers, f"processes outlived their daemons: {leftovers}"


# ---- load and observation ------------------------------------------------------------------

def alloc_status(client, dep: str) -> dict:
    return client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]["allocation_status"]


class Stream:
    """Threads sending a continuous, bounded stream of requests; outcomes recorded."""

    def __init__(self, client, dep: str, threads: int = 4, timeout: str = "5s") -> None:
        self.client, self.dep, self.timeout = client, dep, timeout
        self.stop = threading.Event()
        self.outcomes: list[object] = []
        self.pool = cf.ThreadPoolExecutor(threads)
        self.futs = [self.pool.submit(self._run, i) for i in range(threads)]

    def _run(self, seed: int) -> None:
        from mlfleet.common.errors import ApiError
        r = np.random.default_rng(seed)
        for _ in range(50_000):
            if self.stop.is_set():
                return
            try:
                self.client.infer(self.dep, [{"input": r.standard_normal((1, 8)).astype(np.float32)}],
                                  timeout=self.timeout)
                self.outcomes.append(True)
            except ApiError as e:  # noqa: PERF203
                self.outcomes.append(e)

    def more(self, n: int, timeout_s: float = 30) -> None:
        mark = len(self.outcomes)
        wait_until(lambda: len(self.outcomes) >= mark + n, timeout_s, what=f"{n} more requests")

    def finish(self) -> list[object]:
        self.stop.set()
        for f in self.futs:
            f.result(60)
        self.pool.shutdown()
        return [o for o in self.outcomes if o is not True]


# ---- tiny real TorchScript models -------------------------------------------------------------

class Mlp(torch.nn.Module):
    def __init__(self, n_in: int = 8, n_out: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.a = torch.nn.Linear(n_in, hidden)
        self.b = torch.nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class TwoInOut(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + y, x * y


class Slow(torch.nn.Module):
    """Busy for about ``x[0]`` seconds (a float tensor), then echoes it: for queue and timeout tests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x[0].item() * 2700.0)
        w = torch.eye(192) * 0.5
        acc = torch.ones(192, 192)
        for _ in range(n):
            acc = torch.tanh(acc @ w) + 0.5
        return x + acc.sum() * 0.0


class FakeClock:
    """A clock for pure cores (common/clock.Clock's interface) that moves only when told: ``t``."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def wall_ms(self) -> int:
        return int(self.t * 1000)


def big_archive(path: Path, size: int) -> Path:
    """A TorchScript-shaped zip (it passes the upload check) of ``size`` random bytes."""
    block = os.urandom(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("big/code/__torch__.py", "pass")
        z.writestr("big/constants.pkl", b"")
        with z.open("big/data.pkl", "w", force_zip64=True) as f:
            for _ in range(size >> 20):
                f.write(block)
    return path


def broken_torchscript(path: Path) -> Path:
    """A zip laid out like a TorchScript archive (it passes the upload check) that
    ``torch.jit.load`` cannot read."""
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("broken/data.pkl", b"not a pickle")
        z.writestr("broken/code/__torch__.py", "garbage")
        z.writestr("broken/constants.pkl", b"")
    return path


def descendants_of(daemon: Daemon) -> set[int]:
    return {p.pid for p in daemon.children()}


def save_model(module: torch.nn.Module, path: Path, seed: int = 0) -> Path:
    """A TorchScript file of ``module``: the format most tests deploy, on purpose (it is still the
    format most users have). torch deprecates TorchScript; that warning is expected here and only
    here: pytest no longer hides it anywhere else (pyproject.toml)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit", category=DeprecationWarning)
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))
    return path

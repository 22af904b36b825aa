"""The process shell around one deployment's pure core (``agent/core.py``): it owns the model
host process and its JSON-lines pipe, turns pipe lines, worker messages, client requests and
timers into core events (with the time), and carries out the commands the core returns through
the callbacks the agent's loop gives it (reply, reply_raw, send_worker, schedule).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Optional

from mlfleet.agent.core import (
    Command,
    DeploymentCore,
    HostCommand,
    KillHost,
    Limits,
    Log,
    Observe,
    Phase,
    Reply,
    ReplyRaw,
    Schedule,
    SendWorker,
    StartHost,
    Stats,
    Timer,
    WorkerState,
)
from mlfleet.common import messages as m
from mlfleet.common.protocol import unpack

__all__ = ["DeploymentRuntime", "Phase", "Stats", "WorkerState"]

log = logging.getLogger(__name__)

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}
ReplyFn = Callable[[bytes, int, int, dict], None]


class DeploymentRuntime:
    def __init__(self, a: m.NodeAssignment, *, node_id: str, worker_endpoint: str, clock: Any,
                 reply: ReplyFn, send_worker: Callable[[bytes, dict], None],
                 schedule: Callable[[float, Callable[[], None]], None],
                 restart_budget: int = 3, restart_window_s: float = 60.0,
                 overrun_grace_s: float = 5.0, stop_grace_s: float = 5.0,
                 queue_max_bytes: int = 256 << 20, load_retries: int = 2,
                 require_sandbox: bool = False,
                 reply_raw: Optional[Callable[[bytes, int, int, bytes], None]] = None) -> None:
        self.core = DeploymentCore(a, node_id=node_id, now=clock.monotonic(), wall_ms=clock.wall_ms(),
                                   limits=Limits(restart_budget=restart_budget,
                                                 restart_window_s=restart_window_s,
                                                 overrun_grace_s=overrun_grace_s,
                                                 stop_grace_s=stop_grace_s,
                                                 queue_max_bytes=queue_max_bytes,
                                                 load_retries=load_retries))
        self.worker_endpoint = worker_endpoint
        self.require_sandbox = require_sandbox
        self.clock = clock
        self.reply = reply
        self.reply_raw = reply_raw or (lambda client, rid, status, body: reply(client, rid, status,
                                                                                 unpack(body)))
        self.send_worker = send_worker
        self.schedule = schedule
        self.observe: Optional[Callable[[float, float], None]] = None  # (queue s, compute s) per request
        self._host: Optional[subprocess.Popen] = None
        self._buf = b""
        self._run_cmd: dict[type, Callable[[Any], None]] = {
            ReplyRaw: lambda c: self.reply_raw(c.client, c.rid, c.status, c.body),
            Reply: lambda c: self.reply(c.client, c.rid, c.status, c.body),
            SendWorker: lambda c: self.send_worker(c.identity, c.message),
            HostCommand: lambda c: self._host_cmd(c.to_json()),
            Schedule: lambda c: self.schedule(c.at, lambda t=c.timer: self._timer(t)),
            StartHost: self._start_host,
            KillHost: lambda c: self._kill_host(),
            Observe: lambda c: self.observe(c.queue_s, c.compute_s) if self.observe else None,
            Log: lambda c: log.log(_LEVELS.get(c.level, logging.INFO), "%s", c.message),
        }
        self._host_events: dict[str, Callable[[dict, float], list[Command]]] = {
            "loaded": lambda ev, now: self.core.host_loaded(now),
            "failed": lambda ev, now: self.core.host_failed(str(ev.get("reason", "model host failed")), now),
            "spawned": lambda ev, now: self.core.worker_spawned(str(ev["worker_id"]), int(ev["pid"]), now),
            "exited": lambda ev, now: self.core.worker_exited(str(ev["worker_id"]), ev.get("code"), now),
        }

    def _run(self, cmds: list[Command]) -> None:
        for c in cmds:
            self._run_cmd[type(c)](c)

    def _now(self) -> float:
        return float(self.clock.monotonic())

    # ---- what the agent reads -----------------------------------------------------------------
    @property
    def deployment_id(self) -> str:
        return self.core.deployment_id

    @property
    def phase(self) -> Phase:
        return self.core.phase

    @property
    def target_allocations(self) -> int:
        return self.core.a.target_allocations

    def model_shas(self) -> list[str]:
        """The cached model files this deployment uses."""
        return [sha for sha in (self.core.a.sha256, self.core.a.tokenizer_sha256) if sha]

    def routing_state(self) -> str:
        return self.core.routing_state()

    def ready_count(self) -> int:
        return self.core.ready_count()

    def report(self) -> dict[str, Any]:
        return self.core.report(self._now())

    def reapable(self) -> bool:
        """Stopped, its host gone and its pipe read to the end (its workers accounted)."""
        h = self._host
        return self.core.phase == Phase.STOPPED and (
            h is None or (h.poll() is not None and (h.stdout is None or h.stdout.closed)))

    def wait_host(self, timeout_s: float) -> None:
        """At agent shutdown, after ``kill``: wait for the host to end, then SIGKILL it."""
        if self._host is None:
            return
        try:
            self._host.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._host.kill()
            self._host.wait()

    # ---- events in ----------------------------------------------------------------------------
    def update(self, a: m.NodeAssignment) -> None:
        self._run(self.core.update(a, self._now()))

    def model_ready(self, model_path: str, tokenizer_path: Optional[str]) -> None:
        self._run(self.core.model_ready(model_path, tokenizer_path, self._now()))

    def fail(self, reason: str) -> None:
        self._run(self.core.fail(reason, self._now()))

    def begin_stop(self, finish_pending_work: bool) -> None:
        self._run(self.core.begin_stop(finish_pending_work, self._now()))

    def kill(self) -> None:
        self._run(self.core.kill(self._now()))

    def clear_cache(self) -> None:
        self._run(self.core.clear_cache(self._now()))

    def tick(self) -> None:
        self._run(self.core.tick(self._now()))

    def dispatch(self) -> None:
        self._run(self.core.dispatch(self._now()))

    def _timer(self, which: Timer) -> None:
        self._run(self.core.timer(which, self._now()))

    def submit(self, client: bytes, rid: int, docs: list, timeout_s: float, dispatch: bool = True,
               nbytes: int = 0) -> None:
        """Queue a request (or answer it from the cache); a rejection raises its ApiError."""
        self._run(self.core.submit(client, rid, docs, timeout_s, self._now(), dispatch=dispatch,
                                   nbytes=nbytes))

    def on_worker_message(self, wid: str, msg: dict) -> None:
        op = msg.get("op")
        if op == "results":
            self._run(self.core.worker_results(wid, msg, self._now()))
        elif op == "ready":
            self._run(self.core.worker_ready(wid, int(msg.get("pid", 0)), self._now()))

    # ---- the model host -----------------------------------------------------------------------
    def _start_host(self, c: StartHost) -> None:
        a = self.core.a
        args = [sys.executable, "-m", "mlfleet.agent.host", "--model", c.model_path,
                "--endpoint", self.worker_endpoint, "--threads", str(a.threads_per_allocation),
                "--priority", a.priority, "--task", a.task,
                "--model-config", json.dumps(a.model_config or {}), "--parent-pid", str(os.getpid()),
                "--grace", str(self.core.limits.stop_grace_s)]
        if c.tokenizer_path:
            args += ["--tokenizer", c.tokenizer_path]
        if self.require_sandbox:
            args.append("--require-sandbox")
        self._buf = b""
        # no preexec_fn (unsafe beside ZeroMQ's threads): the host asks for its own death signal.
        # One OpenBLAS thread: the host sandboxes itself while it is still single-threaded.
        self._host = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                      env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        assert self._host.stdout is not None
        os.set_blocking(self._host.stdout.fileno(), False)

    def _host_cmd(self, cmd: dict) -> None:
        h = self._host
        if h is not None and h.stdin is not None and h.poll() is None:
            try:
                h.stdin.write((json.dumps(cmd) + "\n").encode())
                h.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def _kill_host(self) -> None:
        h = self._host
        if h is not None and h.poll() is None:
            log.warning("deployment [%s] on node [%s]: the model host (pid %d) did not exit in time; "
                        "killing it", self.deployment_id, self.core.node_id, h.pid)
            h.kill()

    def host_fd(self) -> Optional[int]:
        h = self._host
        return h.stdout.fileno() if h and h.stdout and not h.stdout.closed else None

    def on_host_readable(self) -> None:
        h = self._host
        if h is None or h.stdout is None or h.stdout.closed:
            return
        try:
            chunk = os.read(h.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            code = h.wait()
            h.stdout.close()
            self._run(self.core.host_exited(code, self._now()))
            return
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                ev = json.loads(line)
                handle = self._host_events.get(ev.get("event")) if isinstance(ev, dict) else None
            except ValueError:
                handle = None
            if handle is None:
                log.warning("deployment [%s]: ignoring a malformed line from its model host: %r",
                            self.deployment_id, line[:200])
                continue
            self._run(handle(ev, self._now()))

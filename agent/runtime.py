"""The process shell around one deployment's pure core (``agent/core.py``): it owns the model
host process and its pipe, turns pipe messages, worker messages, client requests and timers into
core events (with the time), and carries out the commands the core returns through the callbacks
the agent's loop gives it (reply, reply_payload, send_worker, schedule). Every message it reads
or writes is a declared type of common/messages.py in common/protocol.py's envelope.
"""

from __future__ import annotations

import json
import logging
import os
import signal
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
    ReplyPayload,
    Schedule,
    SendWorker,
    StartHost,
    Stats,
    StopWorker,
    Timer,
    WorkerState,
)
from mlfleet.agent.formats import remove_scratch_dirs
from mlfleet.common import messages as m
from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import (
    MAX_MESSAGE_BYTES,
    Buffer,
    PipeReader,
    Request,
    encode_pipe,
    encode_request,
    payload_size,
)

__all__ = ["DeploymentRuntime", "Phase", "Stats", "WorkerState"]

log = logging.getLogger(__name__)

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}
ReplyFn = Callable[[bytes, int, int, dict], None]
FRAME_OVERHEAD = 256  # a kept zmq.Frame beyond its bytes (measured with tracemalloc: about 190)
KILL_WAIT_S = 0.2     # how long the agent's loop waits for a host it killed; later events reap it
EXIT_WAIT_S = 0.25    # ... and for a host whose pipe closed to finish exiting (it closes as it exits)


class DeploymentRuntime:
    def __init__(self, a: m.NodeAssignment, *, node_id: str, worker_endpoint: str, clock: Any,
                 reply: ReplyFn, reply_payload: Callable[[bytes, int, tuple], None],
                 send_worker: Callable[[bytes, list[Buffer]], None],
                 schedule: Callable[[float, Callable[[], None]], None],
                 restart_budget: int = 3, restart_window_s: float = 60.0,
                 overrun_grace_s: float = 5.0, stop_grace_s: float = 5.0,
                 queue_max_bytes: int = 256 << 20, load_retries: int = 2,
                 require_sandbox: bool = False, load_timeout_s: float = 600.0) -> None:
        self.core = DeploymentCore(a, node_id=node_id, now=clock.monotonic(), wall_ms=clock.wall_ms(),
                                   limits=Limits(restart_budget=restart_budget,
                                                 restart_window_s=restart_window_s,
                                                 overrun_grace_s=overrun_grace_s,
                                                 stop_grace_s=stop_grace_s,
                                                 queue_max_bytes=queue_max_bytes,
                                                 load_retries=load_retries,
                                                 load_timeout_s=load_timeout_s))
        self.worker_endpoint = worker_endpoint
        self.require_sandbox = require_sandbox
        self.clock = clock
        self.reply = reply
        self.reply_payload = reply_payload
        self.send_worker = send_worker
        self.schedule = schedule
        self.observe: Optional[Callable[[float, float], None]] = None  # (queue s, compute s) per request
        self._host: Optional[subprocess.Popen] = None
        self._dying: list[subprocess.Popen] = []  # hosts killed, their exit not yet reaped
        self.on_host_change: Callable[[], None] = lambda: None  # a host started, or its pipe closed
        # Every event in: the agent ticks this deployment until its core needs no tick, and its
        # report may have changed (``version`` counts the events; see ``report_key``).
        self.on_event: Callable[[DeploymentRuntime], None] = lambda rt: None
        self.version = 0
        self._pipe = PipeReader()
        self._run_cmd: dict[type, Callable[[Any], None]] = {
            ReplyPayload: lambda c: self.reply_payload(c.client, c.rid, c.payload),
            Reply: lambda c: self.reply(c.client, c.rid, c.status, c.body),
            SendWorker: self._send_jobs,
            StopWorker: lambda c: self.send_worker(c.identity, [encode_request("stop", 0, {})]),
            HostCommand: self._host_cmd,
            Schedule: lambda c: self.schedule(c.at, lambda t=c.timer: self._timer(t)),
            StartHost: self._start_host,
            KillHost: lambda c: self._kill_host(),
            Observe: lambda c: self.observe(c.queue_s, c.compute_s) if self.observe else None,
            Log: lambda c: log.log(_LEVELS.get(c.level, logging.INFO), "%s", c.message),
        }
        self._host_events: dict[str, tuple[type, Callable[[Any, float], list[Command]]]] = {
            "loaded": (m.HostLoaded, lambda ev, now: self.core.host_loaded(now)),
            "failed": (m.HostFailed, lambda ev, now: self.core.host_failed(ev.reason or "model host failed",
                                                                          now)),
            "spawned": (m.WorkerSpawned, lambda ev, now: self.core.worker_spawned(ev.worker_id, ev.pid, now)),
            "exited": (m.WorkerExited, lambda ev, now: self.core.worker_exited(ev.worker_id, ev.code, now)),
        }

    def _run(self, cmds: list[Command]) -> None:
        self.version += 1
        self.on_event(self)
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

    def report(self, now: Optional[float] = None) -> dict[str, Any]:
        return self.core.report(self._now() if now is None else now)

    def report_key(self, now: float) -> tuple[int, int]:
        """Equal keys, equal reports: every change of the core comes with an event (``version``),
        but for the last minute's throughput, which moves with the clock."""
        return self.version, self.core.stats.last_minute(now)

    def needs_tick(self) -> bool:
        return self.core.needs_tick()

    def reapable(self) -> bool:
        """Stopped, its host gone and its pipe read to the end (its workers accounted)."""
        h = self._host
        self._reap_dying()
        return self.core.phase == Phase.STOPPED and not self._dying and (
            h is None or (h.poll() is not None and (h.stdout is None or h.stdout.closed)))

    def _reap_dying(self) -> None:
        """Hosts killed that had not ended: once they have, their scratch dirs go too."""
        for h in [h for h in self._dying if h.poll() is not None]:
            self._dying.remove(h)
            remove_scratch_dirs(h.pid)

    def wait_host(self, timeout_s: float) -> None:
        """At agent shutdown, after ``kill``: wait for the host to end, then SIGKILL it."""
        for h in self._dying:
            try:
                h.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._reap_dying()
        if self._host is None:
            return
        try:
            self._host.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._host.kill()
            self._host.wait()
        remove_scratch_dirs(self._host.pid)

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
        if self._dying:
            self._reap_dying()
        self._run(self.core.tick(self._now()))

    def dispatch(self) -> None:
        self._run(self.core.dispatch(self._now()))

    def _timer(self, which: Timer) -> None:
        self._run(self.core.timer(which, self._now()))

    @property
    def cache_enabled(self) -> bool:
        return self.core.cache.enabled

    def submit(self, client: bytes, rid: int, payload: tuple, timeout_s: float, *,
               key: Optional[bytes] = None, dispatch: bool = True, nbytes: int = 0,
               config: Optional[dict] = None) -> None:
        """Queue a request (or answer it from the cache); a rejection raises its ApiError. The
        payload (the documents' frames) is relayed to a worker as it came, never decoded here."""
        self.version += 1  # a rejection raises before _run, and counts in the report
        self._run(self.core.submit(client, rid, payload, timeout_s, self._now(), key=key,
                                   dispatch=dispatch, nbytes=nbytes, config=config))

    def _send_jobs(self, c: SendWorker) -> None:
        # a RunJobs body (built as a map: it is ours, and dataclasses.asdict costs 20 us a batch)
        frames: list[Buffer] = [encode_request("infer", 0, {"jobs": [
            {"rid": rid, "frames": len(payload), **({"inference_config": cfg} if cfg is not None else {})}
            for rid, payload, cfg in c.jobs]})]
        for _, payload, _ in c.jobs:
            frames.extend(payload)
        self.send_worker(c.identity, frames)

    def on_worker_message(self, wid: str, req: Request, payload: list) -> None:
        """A worker's message: ``req`` its decoded header, ``payload`` the frames after it.
        Workers run model code: what they send is checked like any other input."""
        try:
            if req.op == "results":
                msg = m.decode_results(req.body)
                items, at = [], 0
                for it in msg.items:
                    n = it.get("frames", 0)
                    item = dict(it)
                    if (n >= 1) != (it["status"] == 200):
                        raise ApiError("a 200 result comes with its payload frames, an error with none")
                    if n:
                        part = tuple(payload[at:at + n])
                        if self.core.cache.enabled and len(msg.items) > 1:
                            # the frames are views of the whole message: a cached entry keeps
                            # its own bytes, not its batch mates' with them
                            part = tuple(bytes(f) for f in part)
                        if len(part) != n:
                            raise ApiError(f"[{len(payload)}] payload frames for results that declare more")
                        item["payload"] = part
                        item["nbytes"] = payload_size(part) + FRAME_OVERHEAD * n
                        big = max(len(f) for f in part)
                        if big > MAX_MESSAGE_BYTES:  # a client's socket would drop the connection
                            item = {"rid": it["rid"], "status": 500, "reason": (
                                f"the results cannot be sent: a frame of [{big}] bytes; at most "
                                f"[{MAX_MESSAGE_BYTES}] bytes go in one frame")}
                    at += n
                    items.append(item)
                if at != len(payload):
                    raise ApiError(f"[{len(payload)}] payload frames for results that declare [{at}]")
                self._run(self.core.worker_results(wid, items, msg.time_ms, self._now()))
            elif req.op == "ready":
                ready = m.decode(m.WorkerReady, req.body, "ready")
                self._run(self.core.worker_ready(wid, ready.pid, self._now()))
            else:
                raise ApiError(f"unknown op [{req.op[:64]}]")
        except ApiError as e:
            log.warning("deployment [%s]: worker [%s] broke the protocol: %s", self.deployment_id, wid,
                        e.reason)
            self._run(self.core.worker_broke_protocol(wid, e.reason[:500], self._now()))

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
        self._pipe = PipeReader()
        # no preexec_fn (unsafe beside ZeroMQ's threads): the host asks for its own death signal.
        # One OpenBLAS thread: the host sandboxes itself while it is still single-threaded.
        self._host = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                      env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        assert self._host.stdout is not None
        os.set_blocking(self._host.stdout.fileno(), False)
        self.on_host_change()

    def _host_cmd(self, c: HostCommand) -> None:
        h = self._host
        if h is not None and h.stdin is not None and h.poll() is None:
            try:
                h.stdin.write(encode_pipe(*c.message()))
                h.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def _kill_host(self) -> None:
        h = self._host
        if h is not None and h.poll() is None:
            log.warning("deployment [%s] on node [%s]: the model host (pid %d) did not exit in time; "
                        "killing it", self.deployment_id, self.core.node_id, h.pid)
            h.kill()

    def host_pid(self) -> Optional[int]:
        """The running model host's pid (its workers are its children), or None (also for a host
        killed and not yet reaped)."""
        h = self._host
        return h.pid if h is not None and h not in self._dying and h.poll() is None else None

    def host_fd(self) -> Optional[int]:
        h = self._host
        return h.stdout.fileno() if h and h.stdout and not h.stdout.closed else None

    def _host_closed(self, h: subprocess.Popen) -> None:
        """The host's stdout reached its end. A host ends by exiting; one that closed its stdout
        (its channel to the agent) and runs on broke the pipe protocol (model code in it may
        have): it is killed. The agent's loop never waits on it for more than KILL_WAIT_S; one
        that SIGKILL has not ended by then is reaped on a later event (``_reap_dying``). A host
        that is exiting gets EXIT_WAIT_S to finish first (no warning, nothing killed)."""
        assert h.stdout is not None
        h.stdout.close()
        try:  # the pipe closes as the host exits: its exit is a moment behind
            code = h.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            log.warning("deployment [%s] on node [%s]: the model host (pid %d) closed its pipe to "
                        "the agent and runs on; killing it", self.deployment_id, self.core.node_id, h.pid)
            h.kill()
            try:
                code = h.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                code = -signal.SIGKILL
                self._dying.append(h)
        if h not in self._dying:
            remove_scratch_dirs(h.pid)
        self.on_host_change()
        self._run(self.core.host_exited(code, self._now()))

    def on_host_readable(self) -> None:
        h = self._host
        if h is None or h.stdout is None or h.stdout.closed:
            return
        try:
            chunk = os.read(h.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._host_closed(h)
            return
        try:
            events = self._pipe.feed(chunk)
        except ApiError as e:  # the stream cannot be trusted past a bad message: end the host
            log.warning("deployment [%s]: its model host broke the pipe protocol (%s); killing it",
                        self.deployment_id, e.reason)
            h.kill()
            return
        for ev in events:
            handler = self._host_events.get(ev.op)
            try:
                if handler is None:
                    raise ApiError(f"unknown host event [{ev.op[:64]}]")
                decoded = m.decode(handler[0], ev.body, ev.op)
            except ApiError as e:
                log.warning("deployment [%s]: ignoring a malformed message from its model host: %s",
                            self.deployment_id, e.reason)
                continue
            self._run(handler[1](decoded, self._now()))

"""One deployment as this node runs it: its model host process, its allocation workers, its
queue and its stats. The agent's loop feeds it events (assignment changes, host events, worker
messages, client requests, ticks); it answers clients and commands its host through callbacks.
"""

from __future__ import annotations

import collections
import enum
import itertools
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from common import messages as m
from common.errors import ApiError, Conflict, NotFound, RequestTimeout, ServerError, TooManyRequests
from common.proc import describe_exit, set_parent_death_signal

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class Phase(str, enum.Enum):
    FETCHING = "fetching"     # model bytes on their way from the coordinator
    LOADING = "loading"       # host process loading the weights
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class WorkerState(str, enum.Enum):
    SPAWNING = "spawning"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"     # finishes what it holds, takes nothing new, then is stopped
    KILLED = "killed"


@dataclass
class Worker:
    worker_id: str
    identity: bytes
    state: WorkerState = WorkerState.SPAWNING
    pid: Optional[int] = None
    job: Optional[int] = None


@dataclass
class Job:
    client: bytes
    rid: int
    docs: list
    deadline: float
    enqueued: float
    answered: bool = False


@dataclass
class Stats:
    start_time_ms: int
    inference_count: int = 0
    error_count: int = 0
    timeout_count: int = 0
    rejected_execution_count: int = 0
    cache_hit_count: int = 0
    total_time_ms: float = 0.0
    last_access_ms: Optional[int] = None
    peak_per_minute: int = 0
    recent: collections.deque = field(default_factory=collections.deque)

    def record(self, now: float, wall_ms: int, time_ms: float) -> None:
        self.inference_count += 1
        self.total_time_ms += time_ms
        self.last_access_ms = wall_ms
        self.recent.append(now)

    def last_minute(self, now: float) -> int:
        while self.recent and self.recent[0] < now - 60.0:
            self.recent.popleft()
        n = len(self.recent)
        self.peak_per_minute = max(self.peak_per_minute, n)
        return n


Reply = Callable[[bytes, int, int, dict], None]


class DeploymentRuntime:
    def __init__(self, a: m.NodeAssignment, *, node_id: str, worker_endpoint: str, clock,
                 reply: Reply, send_worker: Callable[[bytes, dict], None],
                 restart_budget: int = 3, restart_window_s: float = 60.0) -> None:
        self.a = a
        self.node_id = node_id
        self.worker_endpoint = worker_endpoint
        self.clock = clock
        self.reply = reply
        self.send_worker = send_worker
        self.phase = Phase.FETCHING
        self.reason = ""
        self.host: Optional[subprocess.Popen] = None
        self.host_buf = b""
        self.workers: dict[str, Worker] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.stats = Stats(start_time_ms=clock.wall_ms())
        self.restarts: collections.deque[float] = collections.deque()
        self.restart_budget = restart_budget
        self.restart_window_s = restart_window_s

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def deployment_id(self) -> str:
        return self.a.deployment_id

    def _set_phase(self, phase: Phase, reason: str = "") -> None:
        if phase != self.phase:
            log.info("deployment [%s] on node [%s]: %s -> %s%s", self.deployment_id, self.node_id,
                     self.phase.value, phase.value, f" ({reason})" if reason else "")
        self.phase, self.reason = phase, reason

    def update(self, a: m.NodeAssignment) -> None:
        self.a = a
        if a.stopping and self.phase not in (Phase.STOPPING, Phase.STOPPED):
            self.begin_stop(a.finish_pending_work)

    def model_ready(self, model_path: str) -> None:
        """The model file is cached and verified: start the host that loads it."""
        if self.phase != Phase.FETCHING:
            return
        self._set_phase(Phase.LOADING)
        self.host = subprocess.Popen(
            [sys.executable, "-m", "agent.host", "--model", model_path,
             "--endpoint", self.worker_endpoint, "--threads", str(self.a.threads_per_allocation),
             "--priority", self.a.priority],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=set_parent_death_signal,
            close_fds=True)
        os.set_blocking(self.host.stdout.fileno(), False)

    def fail(self, reason: str) -> None:
        self._set_phase(Phase.FAILED, reason)
        self._fail_queue(ServerError(f"deployment [{self.deployment_id}] failed on node "
                                     f"[{self.node_id}]: {reason}"))
        self._host_cmd({"cmd": "exit"})

    def begin_stop(self, finish_pending_work: bool) -> None:
        self._set_phase(Phase.STOPPING)
        if not finish_pending_work:
            self._fail_queue(Conflict(f"Trained model deployment [{self.deployment_id}] is [stopping]",
                                      retryable=True))
        self.tick()

    def kill(self) -> None:
        """Stop now: fail what waits, end the host (its workers die with it)."""
        self._fail_queue(Conflict(f"Trained model deployment [{self.deployment_id}] is [stopping]",
                                  retryable=True))
        for job_id, job in list(self.jobs.items()):
            self._answer_error(job, ServerError(f"deployment [{self.deployment_id}] was stopped on "
                                                f"node [{self.node_id}] while running this request"))
        self.jobs.clear()
        if self.host and self.host.poll() is None:
            self._host_cmd({"cmd": "exit"})
        self._set_phase(Phase.STOPPED)

    # ---- host -----------------------------------------------------------------------------------
    def _host_cmd(self, cmd: dict) -> None:
        if self.host and self.host.poll() is None:
            try:
                self.host.stdin.write((json.dumps(cmd) + "\n").encode())
                self.host.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def host_fd(self) -> Optional[int]:
        return self.host.stdout.fileno() if self.host and self.host.stdout and not self.host.stdout.closed else None

    def on_host_readable(self) -> None:
        try:
            chunk = os.read(self.host.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._on_host_exit()
            return
        self.host_buf += chunk
        while b"\n" in self.host_buf:
            line, self.host_buf = self.host_buf.split(b"\n", 1)
            self._on_host_event(json.loads(line))

    def _on_host_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "loaded":
            if self.phase == Phase.LOADING:
                self._set_phase(Phase.RUNNING)
            self.tick()
        elif kind == "failed":
            self.fail(ev.get("reason", "model host failed"))
        elif kind == "spawned":
            w = self.workers.get(ev["worker_id"])
            if w:
                w.pid = ev["pid"]
        elif kind == "exited":
            self._on_worker_exit(ev["worker_id"], ev.get("code"))

    def _on_host_exit(self) -> None:
        code = self.host.wait()
        self.host.stdout.close()
        for w in list(self.workers.values()):
            self._on_worker_exit(w.worker_id, None)
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            self._set_phase(Phase.STOPPED)
        elif self.phase != Phase.FAILED:
            self.fail(f"model host {describe_exit(code)}")
        else:
            self.phase = Phase.FAILED

    # ---- workers --------------------------------------------------------------------------------
    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state in (WorkerState.SPAWNING, WorkerState.IDLE,
                                                               WorkerState.BUSY)]

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    def _spawn_worker(self) -> None:
        wid = f"w{next(_ids)}"
        identity = f"{self.deployment_id}|{self.node_id}|{wid}".encode()
        self.workers[wid] = Worker(wid, identity)
        self._host_cmd({"cmd": "spawn", "worker_id": wid, "identity": identity.decode()})

    def on_worker_ready(self, wid: str, pid: int) -> None:
        w = self.workers.get(wid)
        if w is None or w.state != WorkerState.SPAWNING:
            return
        w.state, w.pid = WorkerState.IDLE, pid
        log.info("deployment [%s] on node [%s]: allocation worker %s ready (pid %d), %d/%d",
                 self.deployment_id, self.node_id, wid, pid, self.ready_count(), self.a.target_allocations)
        self.dispatch()

    def _on_worker_exit(self, wid: str, code: Optional[int]) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        if w.job is not None:
            job = self.jobs.pop(w.job, None)
            if job:
                self._answer_error(job, ServerError(
                    f"allocation worker of deployment [{self.deployment_id}] on node [{self.node_id}] "
                    f"{describe_exit(code)} while running this request"))
        if w.state == WorkerState.KILLED or self.phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
            return
        now = self.clock.monotonic()
        self.restarts.append(now)
        while self.restarts and self.restarts[0] < now - self.restart_window_s:
            self.restarts.popleft()
        log.warning("deployment [%s] on node [%s]: worker %s %s", self.deployment_id, self.node_id,
                    wid, describe_exit(code))
        if len(self.restarts) > self.restart_budget:
            self.fail(f"allocation workers exited {len(self.restarts)} times in "
                      f"{self.restart_window_s:.0f}s; last: {describe_exit(code)}")
        else:
            self.tick()

    def on_worker_message(self, wid: str, msg: dict) -> None:
        op = msg.get("op")
        if op == "ready":
            self.on_worker_ready(wid, int(msg.get("pid", 0)))
            return
        w = self.workers.get(wid)
        if w is None:
            return
        job = self.jobs.pop(msg.get("rid"), None) if w.job == msg.get("rid") else None
        w.job = None
        if w.state == WorkerState.BUSY:
            w.state = WorkerState.IDLE
        if job is not None and not job.answered:
            now = self.clock.monotonic()
            if op == "result":
                self.stats.record(now, self.clock.wall_ms(), float(msg.get("time_ms", 0.0)))
                job.answered = True
                self.reply(job.client, job.rid, 200, {"inference_results": msg.get("results", [])})
            else:
                status = int(msg.get("status", 500))
                self._answer_error(job, ApiError(str(msg.get("reason", "inference failed")), status=status))
        self.tick()

    # ---- requests -------------------------------------------------------------------------------
    def serving(self) -> bool:
        return self.phase in (Phase.FETCHING, Phase.LOADING, Phase.RUNNING) or (
            self.phase == Phase.STOPPING and self.a.finish_pending_work)

    def submit(self, client: bytes, rid: int, docs: list, timeout_s: float) -> None:
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            raise Conflict(f"Trained model deployment [{self.deployment_id}] is [stopping]", retryable=True)
        if self.phase == Phase.FAILED:
            raise NotFound(f"deployment [{self.deployment_id}] has failed on node [{self.node_id}]: "
                           f"{self.reason}", retryable=True)
        if len(self.queue) >= self.a.queue_capacity:
            self.stats.rejected_execution_count += 1
            raise TooManyRequests(
                f"inference process queue for deployment [{self.deployment_id}] on node "
                f"[{self.node_id}] is full ({self.a.queue_capacity}). Unable to execute command",
                retry_after_ms=self._retry_after_ms())
        now = self.clock.monotonic()
        self.queue.append(Job(client, rid, docs, now + timeout_s, now))
        self.dispatch()

    def _retry_after_ms(self) -> int:
        n = self.stats.inference_count
        per_ms = (self.stats.total_time_ms / n) if n else 10.0
        ready = max(1, self.ready_count())
        return max(1, int(len(self.queue) * per_ms / ready))

    def dispatch(self) -> None:
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return
        idle = [w for w in self.workers.values() if w.state == WorkerState.IDLE]
        now = self.clock.monotonic()
        while idle and self.queue:
            job = self.queue.popleft()
            if now >= job.deadline:
                self._timeout(job)
                continue
            w = idle.pop()
            job_id = next(_ids)
            self.jobs[job_id] = job
            w.state, w.job = WorkerState.BUSY, job_id
            self.send_worker(w.identity, {"op": "infer", "rid": job_id, "docs": job.docs})

    def _timeout(self, job: Job) -> None:
        self.stats.timeout_count += 1
        timeout_s = job.deadline - job.enqueued
        self._answer_error(job, RequestTimeout(
            f"inference on deployment [{self.deployment_id}] timed out after [{timeout_s:.3g}s] "
            f"on node [{self.node_id}]"), count=False)

    def _answer_error(self, job: Job, e: ApiError, count: bool = True) -> None:
        if job.answered:
            return
        job.answered = True
        if count and e.status not in (408, 429) and not e.retryable:
            self.stats.error_count += 1
        self.reply(job.client, job.rid, e.status, e.to_body())

    def _fail_queue(self, e: ApiError) -> None:
        while self.queue:
            self._answer_error(self.queue.popleft(), e, count=False)

    def clear_cache(self) -> None:
        pass  # the inference cache arrives with its own issue; nothing is cached yet

    # ---- reconcile ------------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock.monotonic()
        # deadlines: queued requests are dropped unrun; running ones are answered (result dropped)
        if self.queue and any(now >= j.deadline for j in self.queue):
            keep = collections.deque()
            for j in self.queue:
                (self._timeout(j) if now >= j.deadline else keep.append(j))
            self.queue = keep
        for job in self.jobs.values():
            if not job.answered and now >= job.deadline:
                self._timeout(job)
        if self.phase == Phase.RUNNING:
            live = self.live_workers()
            want = self.a.target_allocations
            for _ in range(want - len(live)):
                self._spawn_worker()
            if len(live) > want:
                # drain the surplus, idle ones first, newest first
                order = sorted(live, key=lambda w: (w.state == WorkerState.BUSY,
                                                    w.state != WorkerState.SPAWNING, w.worker_id))
                for w in order[: len(live) - want]:
                    w.state = WorkerState.DRAINING
        for w in list(self.workers.values()):
            if w.state == WorkerState.DRAINING and w.job is None:
                w.state = WorkerState.KILLED
                self.send_worker(w.identity, {"op": "stop"})
                self._host_cmd({"cmd": "kill", "worker_id": w.worker_id})
        if self.phase == Phase.STOPPING:
            if not self.queue and not self.jobs:
                for w in self.workers.values():
                    if w.state != WorkerState.KILLED:
                        w.state = WorkerState.DRAINING
                self._host_cmd({"cmd": "exit"})
                if self.host is None:
                    self._set_phase(Phase.STOPPED)
        self.dispatch()

    # ---- reports --------------------------------------------------------------------------------
    def routing_state(self) -> str:
        if self.phase == Phase.FAILED:
            return "failed"
        if self.phase == Phase.STOPPED:
            return "stopped"
        if self.phase == Phase.STOPPING:
            return "stopping"
        if self.phase == Phase.RUNNING and self.ready_count() > 0:
            return "started"
        return "starting"

    def report(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        s = self.stats
        n = s.inference_count
        avg = s.total_time_ms / n if n else 0.0
        last_minute = s.last_minute(now)
        return m.encode(m.RouteReport(
            deployment_id=self.deployment_id, routing_state=self.routing_state(),
            current_allocations=self.ready_count() if self.phase in (Phase.RUNNING, Phase.STOPPING) else 0,
            target_allocations=self.a.target_allocations, reason=self.reason,
            stats={"inference_count": n, "error_count": s.error_count, "timeout_count": s.timeout_count,
                   "rejected_execution_count": s.rejected_execution_count,
                   "inference_cache_hit_count": s.cache_hit_count,
                   "average_inference_time_ms": avg,
                   "average_inference_time_ms_excluding_cache_hits": avg,
                   "number_of_pending_requests": len(self.queue) + sum(
                       1 for j in self.jobs.values() if not j.answered),
                   "throughput_last_minute": last_minute,
                   "peak_throughput_per_minute": s.peak_per_minute,
                   "start_time": s.start_time_ms, "last_access": s.last_access_ms}))

"""One deployment as this node runs it: its model host process, its allocation workers, its
queue, its inference cache and its stats. The agent's loop feeds it events (assignment
changes, host events, worker messages, client requests, ticks); it answers clients and
commands its host and workers through callbacks.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from mlfleet.agent.cache import LruCache
from mlfleet.common import messages as m
from mlfleet.common.errors import (
    ApiError,
    Conflict,
    NotFound,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
)
from mlfleet.common.proc import describe_exit
from mlfleet.common.protocol import pack, unpack

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class Phase(str, enum.Enum):
    FETCHING = "fetching"     # model bytes on their way from the coordinator
    LOADING = "loading"       # host process loading the weights
    RUNNING = "running"
    STOPPING = "stopping"     # no new requests; finishing (or failing) what it holds
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
    jobs: list[int] = field(default_factory=list)


@dataclass
class Job:
    client: bytes
    rid: int
    docs: list
    deadline: float
    enqueued: float
    key: Optional[bytes] = None
    answered: bool = False
    dispatched: float = 0.0
    nbytes: int = 0          # the request's size on the wire, held until it is answered


@dataclass
class Stats:
    """Counts documents (inferences), as Elasticsearch does; cache hits count as inferences.
    The last minute's throughput is kept in 60 one-second buckets: constant memory at any rate."""
    start_time_ms: int
    inference_count: int = 0
    error_count: int = 0
    timeout_count: int = 0
    rejected_execution_count: int = 0
    cache_hit_count: int = 0
    total_time_ms: float = 0.0
    compute_time_ms: float = 0.0
    queue_time_ms: float = 0.0
    batches: int = 0
    batched_jobs: int = 0
    last_access_ms: Optional[int] = None
    peak_per_minute: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * 60)  # docs per second, by second % 60
    bucket_second: int = 0  # the last second written

    def _advance(self, now: float) -> None:
        second = int(now)
        gap = second - self.bucket_second
        if gap > 0:
            for k in range(1, min(gap, 60) + 1):
                self.buckets[(self.bucket_second + k) % 60] = 0
            self.bucket_second = second

    def record(self, now: float, wall_ms: int, docs: int, time_ms: float, hit: bool) -> None:
        self.inference_count += docs
        self.total_time_ms += time_ms
        if hit:
            self.cache_hit_count += docs
        else:
            self.compute_time_ms += time_ms
        self.last_access_ms = wall_ms
        self._advance(now)
        self.buckets[int(now) % 60] += docs

    def last_minute(self, now: float) -> int:
        self._advance(now)
        n = sum(self.buckets)
        self.peak_per_minute = max(self.peak_per_minute, n)
        return n


Reply = Callable[[bytes, int, int, dict], None]


class DeploymentRuntime:
    def __init__(self, a: m.NodeAssignment, *, node_id: str, worker_endpoint: str, clock,
                 reply: Reply, send_worker: Callable[[bytes, dict], None],
                 schedule: Callable[[float, Callable[[], None]], None],
                 restart_budget: int = 3, restart_window_s: float = 60.0,
                 overrun_grace_s: float = 5.0, stop_grace_s: float = 5.0,
                 queue_max_bytes: int = 256 << 20, load_retries: int = 2,
                 require_sandbox: bool = False,
                 reply_raw: Optional[Callable[[bytes, int, int, bytes], None]] = None) -> None:
        self.a = a
        self.node_id = node_id
        self.worker_endpoint = worker_endpoint
        self.clock = clock
        self.reply = reply
        self.reply_raw = reply_raw or (lambda client, rid, status, body: reply(client, rid, status,
                                                                                 unpack(body)))
        self.send_worker = send_worker
        self.schedule = schedule
        self.phase = Phase.FETCHING
        self.reason = ""
        self.host: Optional[subprocess.Popen] = None
        self.host_buf = b""
        self.host_exit_sent = False
        self.workers: dict[str, Worker] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.cache = LruCache(a.cache_size_bytes)
        self.stats = Stats(start_time_ms=clock.wall_ms())
        self.restarts: collections.deque[float] = collections.deque()
        self.restart_budget = restart_budget
        self.restart_window_s = restart_window_s
        self.finish_pending_work = False
        self.overrun_grace_s = overrun_grace_s
        self.stop_grace_s = stop_grace_s
        self.stop_deadline: Optional[float] = None   # past it, a stop stops waiting for work
        self.host_kill_at: Optional[float] = None    # past it, a host that did not exit is killed
        self.queue_max_bytes = queue_max_bytes
        self.held_bytes = 0                           # requests queued or running, on the wire
        self.load_retries = load_retries
        self.require_sandbox = require_sandbox
        self.load_attempts = 0
        self._load_error = ""
        self._paths: tuple[str, Optional[str]] = ("", None)
        self._batch_wake_at: Optional[float] = None
        self._respawn_at = 0.0  # restart backoff after a worker died
        self.observe: Optional[Callable[[float, float], None]] = None  # (queue s, compute s) per request

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
        if a.cache_size_bytes != self.cache.capacity:
            self.cache = LruCache(a.cache_size_bytes)
        if a.stopping and self.phase not in (Phase.STOPPING, Phase.STOPPED):
            self.begin_stop(a.finish_pending_work)
        else:
            self.tick()

    def model_ready(self, model_path: str, tokenizer_path: Optional[str]) -> None:
        """The model file (and tokenizer) are cached and verified: start the host that loads them."""
        if self.phase != Phase.FETCHING:
            return
        self._set_phase(Phase.LOADING)
        self._paths = (model_path, tokenizer_path)
        self._start_host()

    def _start_host(self) -> None:
        if self.phase != Phase.LOADING:
            return
        model_path, tokenizer_path = self._paths
        self.load_attempts += 1
        self.host_exit_sent = False
        self.host_kill_at = None
        self.host_buf = b""
        args = [sys.executable, "-m", "mlfleet.agent.host", "--model", model_path,
                "--endpoint", self.worker_endpoint, "--threads", str(self.a.threads_per_allocation),
                "--priority", self.a.priority, "--task", self.a.task,
                "--model-config", json.dumps(self.a.model_config or {}), "--parent-pid", str(os.getpid()),
                "--grace", str(self.stop_grace_s)]
        if tokenizer_path:
            args += ["--tokenizer", tokenizer_path]
        if self.require_sandbox:
            args.append("--require-sandbox")
        # no preexec_fn (unsafe beside ZeroMQ's threads): the host asks for its own death signal.
        # One OpenBLAS thread: the host sandboxes itself while it is still single-threaded.
        self.host = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                     env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        os.set_blocking(self.host.stdout.fileno(), False)

    def fail(self, reason: str) -> None:
        self._set_phase(Phase.FAILED, reason)
        self._fail_queue(ServerError(f"deployment [{self.deployment_id}] failed on node "
                                     f"[{self.node_id}]: {reason}"))
        self._host_exit()

    def begin_stop(self, finish_pending_work: bool) -> None:
        """Take no new requests; finish the queue (or answer it with a retryable 409), then stop.
        Without finish_pending_work, running requests get ``stop_grace_s`` to finish; then every
        process of the deployment is ended, escalating to SIGKILL."""
        self.finish_pending_work = finish_pending_work
        if self.phase in (Phase.FETCHING, Phase.LOADING, Phase.FAILED) and self.host is None:
            self._fail_queue(self._stopping_error())
            self._set_phase(Phase.STOPPED)
            return
        if self.phase != Phase.STOPPING:
            self.stop_deadline = None if finish_pending_work else self.clock.monotonic() + self.stop_grace_s
        self._set_phase(Phase.STOPPING)
        if not finish_pending_work:
            self._fail_queue(self._stopping_error())
        self.tick()

    def _stopping_error(self) -> ApiError:
        return Conflict(f"Trained model deployment [{self.deployment_id}] is [stopping]", retryable=True)

    def kill(self) -> None:
        """Stop now (agent shutdown): answer everything, end the host (its workers die with it)."""
        self._fail_queue(self._stopping_error())
        for job in self.jobs.values():
            self._answer_error(job, ServerError(f"deployment [{self.deployment_id}] was stopped on "
                                                f"node [{self.node_id}] while running this request"))
        self.jobs.clear()
        self._host_exit()
        self._set_phase(Phase.STOPPED)

    # ---- host -----------------------------------------------------------------------------------
    def _host_cmd(self, cmd: dict) -> None:
        if self.host and self.host.poll() is None:
            try:
                self.host.stdin.write((json.dumps(cmd) + "\n").encode())
                self.host.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def _host_exit(self) -> None:
        """Ask the host to end (it stops its workers, SIGKILL after its grace); past twice the
        grace the agent kills the host itself (its workers die with it)."""
        if not self.host_exit_sent:
            self.host_exit_sent = True
            self._host_cmd({"cmd": "exit"})
            if self.host is not None:
                self.host_kill_at = self.clock.monotonic() + 2 * self.stop_grace_s + 1.0
                self.schedule(self.host_kill_at, self.tick)

    def host_fd(self) -> Optional[int]:
        h = self.host
        return h.stdout.fileno() if h and h.stdout and not h.stdout.closed else None

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
        elif kind == "failed":  # the host exits next; _on_host_exit retries or fails the route
            self._load_error = str(ev.get("reason", "model host failed"))[:1000]
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
        self.host_kill_at = None
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            self._fail_queue(self._stopping_error())
            self._set_phase(Phase.STOPPED)
        elif self.phase == Phase.LOADING:
            reason = self._load_error or f"model host {describe_exit(code)} while loading the model"
            if self.load_attempts <= self.load_retries:
                backoff = 0.5 * 2 ** (self.load_attempts - 1)
                log.warning("deployment [%s] on node [%s]: %s; loading again in %.1fs (attempt %d of %d)",
                            self.deployment_id, self.node_id, reason, backoff, self.load_attempts + 1,
                            self.load_retries + 1)
                self.host = None
                self.schedule(self.clock.monotonic() + backoff, self._start_host)
            else:
                self.host = None
                self.fail(f"{reason} ({self.load_attempts} attempts)")
        elif self.phase != Phase.FAILED:
            self.fail(f"model host {describe_exit(code)}")

    # ---- workers --------------------------------------------------------------------------------
    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.state in (WorkerState.SPAWNING, WorkerState.IDLE, WorkerState.BUSY)]

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    def _spawn_worker(self) -> None:
        wid = f"w{next(_ids)}"
        identity = f"{self.deployment_id}|{self.node_id}|{wid}".encode()
        self.workers[wid] = Worker(wid, identity)
        self._host_cmd({"cmd": "spawn", "worker_id": wid, "identity": identity.decode()})

    def _on_worker_ready(self, wid: str, pid: int) -> None:
        w = self.workers.get(wid)
        if w is None or w.state != WorkerState.SPAWNING:
            return
        w.state, w.pid = WorkerState.IDLE, pid
        log.info("deployment [%s] on node [%s]: allocation worker %s ready (pid %d), %d/%d",
                 self.deployment_id, self.node_id, wid, pid, self.ready_count(), self.a.target_allocations)
        self.tick()

    def _on_worker_exit(self, wid: str, code: Optional[int]) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        for job_id in w.jobs:
            job = self.jobs.pop(job_id, None)
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
            backoff = min(5.0, 0.1 * 2 ** (len(self.restarts) - 1))
            self._respawn_at = now + backoff
            log.info("deployment [%s] on node [%s]: restarting the worker in %.1fs (%d of %d restarts "
                     "in %.0fs)", self.deployment_id, self.node_id, backoff, len(self.restarts),
                     self.restart_budget, self.restart_window_s)
            self.schedule(self._respawn_at, self.tick)
            self.dispatch()

    def on_worker_message(self, wid: str, msg: dict) -> None:
        op = msg.get("op")
        if op == "ready":
            self._on_worker_ready(wid, int(msg.get("pid", 0)))
            return
        w = self.workers.get(wid)
        if w is None or op != "results":
            return
        items = msg.get("items") or []
        per_doc_ms = float(msg.get("time_ms", 0.0)) / max(1, sum(
            len(self.jobs[i["rid"]].docs) for i in items if i.get("rid") in self.jobs))
        now, wall = self.clock.monotonic(), self.clock.wall_ms()
        for item in items:
            rid = item.get("rid")
            if rid in w.jobs:
                w.jobs.remove(rid)
            job = self.jobs.pop(rid, None)
            if job is None or job.answered:
                continue
            if "results" in item:
                self._release(job)
                self.stats.record(now, wall, len(job.docs), per_doc_ms * len(job.docs), hit=False)
                if self.observe is not None:
                    self.observe(job.dispatched - job.enqueued, per_doc_ms * len(job.docs) / 1000.0)
                body = pack({"inference_results": item["results"]})  # once: sent and cached as is
                if job.key is not None:
                    self.cache.put(job.key, body)
                self.reply_raw(job.client, job.rid, 200, body)
            else:
                self._answer_error(job, ApiError(str(item.get("reason", "inference failed")),
                                                 status=int(item.get("status", 500))))
        if not w.jobs:
            if w.state == WorkerState.BUSY:
                w.state = WorkerState.IDLE
            elif w.state == WorkerState.DRAINING:
                self._retire(w)
        if self.phase == Phase.STOPPING:
            self.tick()
        else:
            self.dispatch()  # the hot path: deadlines and reconciling wait for the periodic tick

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, client: bytes, rid: int, docs: list, timeout_s: float, dispatch: bool = True,
               nbytes: int = 0) -> None:
        """Queue a request (or answer it from the cache). ``dispatch=False`` leaves handing work to
        workers to the caller, which drains a burst of requests first so they can share a batch.
        ``nbytes`` is the request's size on the wire: the bytes held for requests not yet answered
        have a budget (``queue_max_bytes``), as their count has one (``queue_capacity``)."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            raise self._stopping_error()
        if self.phase == Phase.FAILED:
            raise NotFound(f"deployment [{self.deployment_id}] has failed on node [{self.node_id}]: "
                           f"{self.reason}", retryable=True)
        key = None
        if self.cache.enabled:
            key = self.cache.key(pack(docs))
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.record(self.clock.monotonic(), self.clock.wall_ms(), len(docs), 0.0, hit=True)
                self.reply_raw(client, rid, 200, hit)
                return
        if self.a.target_allocations == 0:  # warm at zero (adaptive): the client must ask for one
            raise ServiceUnavailable(f"deployment [{self.deployment_id}] has no allocation on node "
                                     f"[{self.node_id}]", retryable=True)
        idle = sum(1 for w in self.workers.values() if w.state == WorkerState.IDLE)
        if len(self.queue) >= self.a.queue_capacity + idle:  # idle workers take theirs at dispatch
            self.stats.rejected_execution_count += 1
            raise TooManyRequests(
                f"inference process queue for deployment [{self.deployment_id}] on node "
                f"[{self.node_id}] is full ({self.a.queue_capacity}). Unable to execute command",
                retry_after_ms=self.retry_after_ms())
        if self.held_bytes + nbytes > self.queue_max_bytes and (self.queue or self.jobs):
            self.stats.rejected_execution_count += 1
            raise TooManyRequests(
                f"inference process queue for deployment [{self.deployment_id}] on node "
                f"[{self.node_id}] holds [{self.held_bytes}] bytes of requests; this one ([{nbytes}] "
                f"bytes) would pass its budget of [{self.queue_max_bytes}] bytes (--queue-max-bytes). "
                "Unable to execute command", retry_after_ms=self.retry_after_ms())
        now = self.clock.monotonic()
        self.held_bytes += nbytes
        self.queue.append(Job(client, rid, docs, now + timeout_s, now, key, nbytes=nbytes))
        if dispatch:
            self.dispatch()

    def retry_after_ms(self) -> int:
        """When a slot is likely to free up: the queue ahead, served at the measured rate."""
        computed = self.stats.inference_count - self.stats.cache_hit_count
        per_doc_ms = (self.stats.compute_time_ms / computed) if computed else 10.0
        ready = max(1, self.ready_count())
        docs_ahead = sum(len(j.docs) for j in self.queue) or 1
        return max(1, int(docs_ahead * per_doc_ms / ready))

    def dispatch(self) -> None:
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return
        now = self.clock.monotonic()
        idle = [w for w in self.workers.values() if w.state == WorkerState.IDLE]
        max_batch, delay = max(1, self.a.max_batch_size), self.a.max_batch_delay_ms / 1000.0
        for k, w in enumerate(idle):
            if not self.queue:
                return
            # share what waits among the idle workers rather than giving one worker all of it
            batch = min(max_batch, -(-len(self.queue) // (len(idle) - k)))
            if delay > 0 and len(self.queue) < max_batch and now < self.queue[0].enqueued + delay:
                due = self.queue[0].enqueued + delay
                if self._batch_wake_at is None or due < self._batch_wake_at:
                    self._batch_wake_at = due
                    self.schedule(due, self._batch_wake)
                return
            jobs = []
            while self.queue and len(jobs) < batch:
                job = self.queue.popleft()
                if now >= job.deadline:
                    self._timeout(job)
                    continue
                job_id = next(_ids)
                job.dispatched = now
                self.jobs[job_id] = job
                jobs.append({"rid": job_id, "docs": job.docs})
                self.stats.queue_time_ms += (now - job.enqueued) * 1000
            if jobs:
                self.stats.batches += 1
                self.stats.batched_jobs += len(jobs)
                w.state, w.jobs = WorkerState.BUSY, [j["rid"] for j in jobs]
                self.send_worker(w.identity, {"op": "infer", "jobs": jobs})

    def _batch_wake(self) -> None:
        self._batch_wake_at = None
        self.dispatch()

    def _timeout(self, job: Job) -> None:
        if job.answered:
            return
        self.stats.timeout_count += 1
        timeout_s = job.deadline - job.enqueued
        self._answer_error(job, RequestTimeout(
            f"inference on deployment [{self.deployment_id}] timed out after [{timeout_s:.3g}s] "
            f"on node [{self.node_id}]"))

    def _release(self, job: Job) -> None:
        """A job is answered: once, and the bytes it held are free again."""
        job.answered = True
        self.held_bytes -= job.nbytes
        job.nbytes = 0

    def _answer_error(self, job: Job, e: ApiError) -> None:
        if job.answered:
            return
        self._release(job)
        if e.status not in (408, 429) and not e.retryable:
            self.stats.error_count += 1
        self.reply(job.client, job.rid, e.status, e.to_body())

    def _fail_queue(self, e: ApiError) -> None:
        while self.queue:
            self._answer_error(self.queue.popleft(), e)

    def clear_cache(self) -> None:
        self.cache.clear()
        log.info("deployment [%s] on node [%s]: inference cache cleared", self.deployment_id, self.node_id)

    # ---- reconcile ------------------------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock.monotonic()
        # deadlines: queued requests are dropped unrun; running ones are answered (result dropped)
        if self.queue and any(now >= j.deadline for j in self.queue):
            keep: collections.deque[Job] = collections.deque()
            for j in self.queue:
                if now >= j.deadline:
                    self._timeout(j)
                else:
                    keep.append(j)
            self.queue = keep
        for job in self.jobs.values():
            if not job.answered and now >= job.deadline:
                self._timeout(job)
        self._cut_overruns(now)
        if self.phase == Phase.RUNNING:
            live = self.live_workers()
            want = self.a.target_allocations
            if now >= self._respawn_at:
                for _ in range(want - len(live)):
                    self._spawn_worker()
            if len(live) > want:
                # drain the surplus: idle ones first, then those still starting, busy ones last
                order = sorted(live, key=lambda w: (w.state == WorkerState.BUSY,
                                                    w.state != WorkerState.IDLE, w.worker_id))
                for w in order[: len(live) - want]:
                    w.state = WorkerState.DRAINING
        for w in list(self.workers.values()):
            if w.state == WorkerState.DRAINING and not w.jobs:
                self._retire(w)
        if self.phase == Phase.STOPPING and self.stop_deadline is not None and now >= self.stop_deadline:
            self._fail_queue(self._stopping_error())
            for w in list(self.workers.values()):
                if w.jobs:
                    self._kill_worker(w, f"the deployment was stopped and its stop grace "
                                         f"({self.stop_grace_s:g}s) passed")
        if self.phase == Phase.STOPPING and not self.queue and not self.jobs:
            for w in self.workers.values():
                if w.state not in (WorkerState.KILLED,):
                    w.state = WorkerState.KILLED
            self._host_exit()
            if self.host is None:
                self._set_phase(Phase.STOPPED)
        if (self.host_kill_at is not None and now >= self.host_kill_at and self.host is not None
                and self.host.poll() is None):
            log.warning("deployment [%s] on node [%s]: the model host (pid %d) did not exit in time; "
                        "killing it", self.deployment_id, self.node_id, self.host.pid)
            self.host.kill()
            self.host_kill_at = None
        self.dispatch()

    def _cut_overruns(self, now: float) -> None:
        """A forward pass past its request's deadline by ``overrun_grace_s`` is cut off: its worker
        is killed and replaced by a new fork of the warm host (the next tick spawns it)."""
        for w in list(self.workers.values()):
            if not w.jobs or w.state == WorkerState.KILLED:
                continue
            late = [j for j in (self.jobs.get(i) for i in w.jobs) if j is not None
                    and now >= j.deadline + self.overrun_grace_s]
            if late:
                self._kill_worker(w, f"a forward pass ran past its request's deadline by more than "
                                     f"{self.overrun_grace_s:g}s")

    def _kill_worker(self, w: Worker, why: str) -> None:
        log.warning("deployment [%s] on node [%s]: killing allocation worker %s (pid %s): %s",
                    self.deployment_id, self.node_id, w.worker_id, w.pid, why)
        for job_id in w.jobs:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._answer_error(job, ServerError(
                    f"allocation worker of deployment [{self.deployment_id}] on node [{self.node_id}] "
                    f"was killed while running this request: {why}"))
        w.jobs = []
        w.state = WorkerState.KILLED
        self._host_cmd({"cmd": "kill", "worker_id": w.worker_id, "force": True})

    def _retire(self, w: Worker) -> None:
        w.state = WorkerState.KILLED
        self.send_worker(w.identity, {"op": "stop"})
        self._host_cmd({"cmd": "kill", "worker_id": w.worker_id})

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
        computed = n - s.cache_hit_count
        last_minute = s.last_minute(now)
        return m.encode(m.RouteReport(
            deployment_id=self.deployment_id, routing_state=self.routing_state(),
            current_allocations=self.ready_count() if self.phase in (Phase.RUNNING, Phase.STOPPING) else 0,
            target_allocations=self.a.target_allocations, reason=self.reason,
            stats={"inference_count": n, "error_count": s.error_count, "timeout_count": s.timeout_count,
                   "rejected_execution_count": s.rejected_execution_count,
                   "inference_cache_hit_count": s.cache_hit_count,
                   "average_inference_time_ms": s.total_time_ms / n if n else 0.0,
                   "average_inference_time_ms_excluding_cache_hits":
                       s.compute_time_ms / computed if computed else 0.0,
                   "average_queue_time_ms": s.queue_time_ms / s.batched_jobs if s.batched_jobs else 0.0,
                   "number_of_pending_requests": len(self.queue) + sum(
                       1 for j in self.jobs.values() if not j.answered),
                   "throughput_last_minute": last_minute,
                   "peak_throughput_per_minute": s.peak_per_minute,
                   "cache_bytes": self.cache.used,
                   "average_batch_size": s.batched_jobs / s.batches if s.batches else 0.0,
                   "start_time": s.start_time_ms, "last_access": s.last_access_ms}))

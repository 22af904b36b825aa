"""One deployment on one node, as a pure state object: events in, commands out, time passed in.

``DeploymentCore`` holds the deployment's phase, its allocation workers, its queue (with a
count and a byte budget), batching, deadlines, the overrun cut-off, stopping (with or without
finishing pending work, and the stop grace), load retries, the worker restart budget, scaling up
and down, the inference cache and the stats. It starts no process, opens no socket, reads no
clock and logs nothing: every event method takes ``now`` (monotonic seconds) and returns the
commands the shell (``agent/runtime.py``) carries out, in order.

Worker states change in one place, ``_move``, and only along the edges of ``WORKER_MOVES``::

    SPAWNING -> IDLE      the worker said ready
    IDLE     -> BUSY      a batch was handed to it
    BUSY     -> IDLE      it answered all it held
    SPAWNING, IDLE, BUSY -> DRAINING   scaled down: finish what it holds, take nothing new
    SPAWNING, IDLE, BUSY, DRAINING -> KILLED   retired, cut off, or the deployment stopped
    any      -> EXITED    its process is gone (the host said so, or the host itself is gone)

An ``EXITED`` worker is forgotten at once. Phases move along ``PHASE_MOVES`` through ``_set_phase``.
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from mlfleet.agent.cache import LruCache
from mlfleet.agent.commands import (
    Command,
    HostCommand,
    KillHost,
    Log,
    Observe,
    Payload,
    Reply,
    ReplyPayload,
    Schedule,
    SendWorker,
    StartHost,
    StopWorker,
    Timer,
)
from mlfleet.agent.stats import Stats
from mlfleet.common import messages as m
from mlfleet.common.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
)
from mlfleet.common.proc import describe_exit
from mlfleet.common.stream import MAX_BYTES, MAX_FRAMES

__all__ = [  # the commands and stats are defined beside the core, and read from here too
    "Command", "DeploymentCore", "HostCommand", "IllegalTransition", "Job", "KillHost", "Limits", "Log",
    "Observe", "PHASE_MOVES", "Payload", "Phase", "Reply", "ReplyPayload", "Schedule", "SendWorker",
    "StartHost", "Stats", "StopWorker", "Timer", "WORKER_MOVES", "Worker", "WorkerState",
]

_ids = itertools.count(1)  # worker and job ids, unique in the agent (worker identities must be)

# A batch is one message on the worker's stream (common/stream.py): a header frame, then every
# job's payload frames, within the stream's MAX_FRAMES and MAX_BYTES. A job's bytes are counted as
# its request's size on the wire (``Job.nbytes``: the client's header, which holds its
# inference_config, and its payload frames) and JOB_HEADER_BYTES, for what its entry in the batch
# header may take beyond the client's header (its inference_config's floats re-encoded as
# float64); BATCH_HEADER_BYTES is the batch header's own envelope.
JOB_HEADER_BYTES = 1024
BATCH_HEADER_BYTES = 4096


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
    KILLED = "killed"         # asked to end; its exit is still to come
    EXITED = "exited"         # its process is gone; the worker is forgotten


W = WorkerState
WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    W.SPAWNING: frozenset({W.IDLE, W.DRAINING, W.KILLED, W.EXITED}),
    W.IDLE: frozenset({W.BUSY, W.DRAINING, W.KILLED, W.EXITED}),
    W.BUSY: frozenset({W.IDLE, W.DRAINING, W.KILLED, W.EXITED}),
    W.DRAINING: frozenset({W.KILLED, W.EXITED}),
    W.KILLED: frozenset({W.EXITED}),
    W.EXITED: frozenset(),
}
P = Phase
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    P.FETCHING: frozenset({P.LOADING, P.FAILED, P.STOPPED}),
    P.LOADING: frozenset({P.RUNNING, P.FAILED, P.STOPPING, P.STOPPED}),
    P.RUNNING: frozenset({P.FAILED, P.STOPPING, P.STOPPED}),
    P.STOPPING: frozenset({P.STOPPED}),
    P.FAILED: frozenset({P.STOPPING, P.STOPPED}),
    P.STOPPED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the tables do not allow: a bug in the core, never a client's doing."""


# ---- state -------------------------------------------------------------------------------------
@dataclass
class Worker:
    worker_id: str
    identity: bytes
    state: WorkerState = WorkerState.SPAWNING
    reason: str = "spawned"   # why it is in its state
    pid: Optional[int] = None
    jobs: list[int] = field(default_factory=list)


@dataclass
class Job:
    client: bytes
    rid: int
    payload: Payload         # the documents as they came: never decoded here
    deadline: float
    enqueued: float
    key: Optional[bytes] = None
    answered: bool = False
    dispatched: float = 0.0
    nbytes: int = 0          # the request's size on the wire, held until it is answered
    config: Optional[dict[str, Any]] = None  # the request's inference_config


@dataclass(frozen=True)
class Limits:
    """The agent's knobs for a deployment (from AgentConfig)."""
    restart_budget: int = 3
    restart_window_s: float = 60.0
    overrun_grace_s: float = 5.0
    stop_grace_s: float = 5.0
    queue_max_bytes: int = 256 << 20
    load_retries: int = 2
    load_timeout_s: float = 600.0  # a host that has not loaded its model by then is killed (a try)


class DeploymentCore:
    def __init__(self, a: m.NodeAssignment, *, node_id: str, now: float, wall_ms: int,
                 limits: Optional[Limits] = None, ids: Optional[Iterator[int]] = None) -> None:
        self.a = a
        self.node_id = node_id
        self.limits = limits or Limits()
        self._ids = ids if ids is not None else _ids
        self._t0, self._wall0 = now, wall_ms   # wall time = wall0 + (now - t0)
        self.phase = Phase.FETCHING
        self.reason = ""
        self.workers: dict[str, Worker] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}
        self.cache = LruCache(a.cache_size_bytes)
        self.stats = Stats(start_time_ms=wall_ms)
        self.restarts: collections.deque[float] = collections.deque()
        self.finish_pending_work = False
        self.stop_deadline: Optional[float] = None   # past it, a stop stops waiting for work
        self.host_up = False                          # a host process runs (or has not been reaped)
        self.host_exit_sent = False
        self.host_kill_at: Optional[float] = None    # past it, a host that did not exit is killed
        self.held_bytes = 0                           # requests queued or running, on the wire
        self.load_attempts = 0
        self._load_error = ""
        self._load_deadline: Optional[float] = None  # the loading host is killed at this time
        self._paths: tuple[str, Optional[str]] = ("", None)
        self._batch_wake_at: Optional[float] = None
        self._respawn_at = 0.0  # restart backoff after a worker died
        self._out: list[Command] = []

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def deployment_id(self) -> str:
        return self.a.deployment_id

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    def _log(self, level: str, msg: str) -> None:
        self._out.append(Log(level, f"deployment [{self.deployment_id}] on node [{self.node_id}]: {msg}"))

    def _wall_ms(self, now: float) -> int:
        return self._wall0 + int((now - self._t0) * 1000)

    def _set_phase(self, phase: Phase, reason: str = "") -> None:
        if phase != self.phase:
            if phase not in PHASE_MOVES[self.phase]:
                raise IllegalTransition(f"deployment [{self.deployment_id}]: phase {self.phase.value} "
                                        f"-> {phase.value} ({reason})")
            self._log("info", f"{self.phase.value} -> {phase.value}" + (f" ({reason})" if reason else ""))
        self.phase, self.reason = phase, reason

    def _move(self, w: Worker, to: WorkerState, reason: str) -> None:
        """The one place a worker's state changes."""
        if to not in WORKER_MOVES[w.state]:
            raise IllegalTransition(f"deployment [{self.deployment_id}]: worker {w.worker_id} "
                                    f"{w.state.value} -> {to.value} ({reason})")
        w.state, w.reason = to, reason
        if to == WorkerState.EXITED:
            self.workers.pop(w.worker_id, None)

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.state in (WorkerState.SPAWNING, WorkerState.IDLE, WorkerState.BUSY)]

    def ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    def _stopping_error(self) -> ApiError:
        return Conflict(f"Trained model deployment [{self.deployment_id}] is [stopping]", retryable=True)

    # ---- lifecycle events -------------------------------------------------------------------
    def update(self, a: m.NodeAssignment, now: float) -> list[Command]:
        """The coordinator's wanted assignment changed (allocations, cache, stopping)."""
        self.a = a
        if a.cache_size_bytes != self.cache.capacity:
            self.cache = LruCache(a.cache_size_bytes)
        if a.stopping and self.phase not in (Phase.STOPPING, Phase.STOPPED):
            self._begin_stop(a.finish_pending_work, now)
        else:
            self._tick(now)
        return self._take()

    def model_ready(self, model_path: str, tokenizer_path: Optional[str], now: float) -> list[Command]:
        """The model file (and tokenizer) are cached and verified: start the host that loads them."""
        if self.phase == Phase.FETCHING:
            self._set_phase(Phase.LOADING)
            self._paths = (model_path, tokenizer_path)
            self._start_host(now)
        return self._take()

    def _start_host(self, now: float) -> None:
        if self.phase != Phase.LOADING or self.host_up:
            return
        self.load_attempts += 1
        self.host_up, self.host_exit_sent, self.host_kill_at = True, False, None
        self._load_deadline = now + self.limits.load_timeout_s
        self._out.append(Schedule(self._load_deadline, Timer.TICK))
        self._out.append(StartHost(self._paths[0], self._paths[1], self.load_attempts))

    def fail(self, reason: str, now: float) -> list[Command]:
        self._fail(reason, now)
        return self._take()

    def _fail(self, reason: str, now: float) -> None:
        self._set_phase(Phase.FAILED, reason)
        self._fail_queue(ServerError(f"deployment [{self.deployment_id}] failed on node "
                                     f"[{self.node_id}]: {reason}"))
        self._host_exit(now)

    def begin_stop(self, finish_pending_work: bool, now: float) -> list[Command]:
        """Take no new requests; finish the queue (or answer it with a retryable 409), then stop.
        Without finish_pending_work, running requests get ``stop_grace_s`` to finish; then every
        process of the deployment is ended, escalating to SIGKILL."""
        self._begin_stop(finish_pending_work, now)
        return self._take()

    def _begin_stop(self, finish_pending_work: bool, now: float) -> None:
        if self.phase == Phase.STOPPED:
            return
        self.finish_pending_work = finish_pending_work
        if self.phase in (Phase.FETCHING, Phase.LOADING, Phase.FAILED) and not self.host_up:
            self._fail_queue(self._stopping_error())
            self._set_phase(Phase.STOPPED)
            return
        if self.phase != Phase.STOPPING:
            self.stop_deadline = None if finish_pending_work else now + self.limits.stop_grace_s
        self._set_phase(Phase.STOPPING)
        if not finish_pending_work:
            self._fail_queue(self._stopping_error())
        self._tick(now)

    def kill(self, now: float) -> list[Command]:
        """Stop now (agent shutdown): answer everything, end the host (its workers die with it)."""
        self._fail_queue(self._stopping_error())
        for job in self.jobs.values():
            self._answer_error(job, ServerError(f"deployment [{self.deployment_id}] was stopped on "
                                                f"node [{self.node_id}] while running this request"))
        self.jobs.clear()
        for w in self.workers.values():
            w.jobs = []
        self._host_exit(now)
        self._set_phase(Phase.STOPPED)
        return self._take()

    def clear_cache(self, now: float) -> list[Command]:
        self.cache.clear()
        self._log("info", "inference cache cleared")
        return self._take()

    # ---- host events ------------------------------------------------------------------------
    def _host_cmd(self, cmd: HostCommand) -> None:
        if self.host_up:
            self._out.append(cmd)

    def _host_exit(self, now: float) -> None:
        """Ask the host to end (it stops its workers, SIGKILL after its grace); past twice the
        grace the agent kills the host itself (its workers die with it)."""
        if not self.host_exit_sent:
            self.host_exit_sent = True
            if self.host_up:
                self._out.append(HostCommand("exit"))
                self.host_kill_at = now + 2 * self.limits.stop_grace_s + 1.0
                self._out.append(Schedule(self.host_kill_at, Timer.TICK))

    def host_loaded(self, now: float) -> list[Command]:
        if self.phase == Phase.LOADING:
            self._set_phase(Phase.RUNNING)
        self._tick(now)
        return self._take()

    def host_failed(self, reason: str, now: float) -> list[Command]:
        """The host could not load the model; it exits next (``host_exited`` retries or fails)."""
        self._load_error = reason[:1000]
        return self._take()

    def worker_spawned(self, wid: str, pid: int, now: float) -> list[Command]:
        w = self.workers.get(wid)
        if w is not None:
            w.pid = pid
        return self._take()

    def host_exited(self, code: Optional[int], now: float) -> list[Command]:
        """The host's pipe closed and it was reaped with ``code``."""
        self.host_up = False
        for w in list(self.workers.values()):
            self._worker_exited(w.worker_id, None, now)
        self.host_kill_at = None
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            self._fail_queue(self._stopping_error())
            self._set_phase(Phase.STOPPED)
        elif self.phase == Phase.LOADING:
            reason = self._load_error or f"model host {describe_exit(code)} while loading the model"
            if self.load_attempts <= self.limits.load_retries:
                backoff = 0.5 * 2 ** (self.load_attempts - 1)
                self._log("warning", f"{reason}; loading again in {backoff:.1f}s (attempt "
                                     f"{self.load_attempts + 1} of {self.limits.load_retries + 1})")
                self._out.append(Schedule(now + backoff, Timer.LOAD))
            else:
                self._fail(f"{reason} ({self.load_attempts} attempts)", now)
        elif self.phase != Phase.FAILED:
            self._fail(f"model host {describe_exit(code)}", now)
        return self._take()

    def timer(self, which: Timer, now: float) -> list[Command]:
        """A ``Schedule`` came due."""
        if which == Timer.LOAD:
            self._start_host(now)
        elif which == Timer.BATCH:
            self._batch_wake_at = None
            self._dispatch(now)
        else:
            self._tick(now)
        return self._take()

    # ---- worker events ----------------------------------------------------------------------
    def _spawn_worker(self) -> None:
        wid = f"w{next(self._ids)}"
        identity = f"{self.deployment_id}|{self.node_id}|{wid}"
        self.workers[wid] = Worker(wid, identity.encode())
        self._host_cmd(HostCommand("spawn", wid, identity))

    def worker_ready(self, wid: str, pid: int, now: float) -> list[Command]:
        w = self.workers.get(wid)
        if w is not None and w.state == WorkerState.SPAWNING:
            w.pid = pid
            self._move(w, WorkerState.IDLE, "ready")
            self._log("info", f"allocation worker {wid} ready (pid {pid}), "
                              f"{self.ready_count()}/{self.a.target_allocations}")
            self._tick(now)
        return self._take()

    def worker_exited(self, wid: str, code: Optional[int], now: float) -> list[Command]:
        self._worker_exited(wid, code, now)
        return self._take()

    def _worker_exited(self, wid: str, code: Optional[int], now: float) -> None:
        w = self.workers.get(wid)
        if w is None:
            return
        was = w.state
        for job_id in w.jobs:
            job = self.jobs.pop(job_id, None)
            if job:
                self._answer_error(job, ServerError(
                    f"allocation worker of deployment [{self.deployment_id}] on node [{self.node_id}] "
                    f"{describe_exit(code)} while running this request"))
        w.jobs = []
        self._move(w, WorkerState.EXITED, describe_exit(code))
        if was == WorkerState.KILLED or self.phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
            return
        self._restart(wid, code, now)

    def _restart(self, wid: str, code: Optional[int], now: float) -> None:
        """A worker died on its own: restart it after a backoff, or fail the route past the budget."""
        lim = self.limits
        self.restarts.append(now)
        while self.restarts and self.restarts[0] < now - lim.restart_window_s:
            self.restarts.popleft()
        self._log("warning", f"worker {wid} {describe_exit(code)}")
        if len(self.restarts) > lim.restart_budget:
            self._fail(f"allocation workers exited {len(self.restarts)} times in "
                       f"{lim.restart_window_s:.0f}s; last: {describe_exit(code)}", now)
        else:
            backoff = min(5.0, 0.1 * 2 ** (len(self.restarts) - 1))
            self._respawn_at = now + backoff
            self._log("info", f"restarting the worker in {backoff:.1f}s ({len(self.restarts)} of "
                              f"{lim.restart_budget} restarts in {lim.restart_window_s:.0f}s)")
            self._out.append(Schedule(self._respawn_at, Timer.TICK))
            self._dispatch(now)

    def worker_results(self, wid: str, items: list[dict[str, Any]], time_ms: float,
                       now: float) -> list[Command]:
        """A worker answered its jobs: ``items`` are ``{"rid", "status": 200, "docs", "payload",
        "nbytes"}`` or ``{"rid", "status", "reason"}``. Answer them, cache what succeeded.
        A worker answers only the jobs it holds: a result for any other id (another worker's
        job, a guessed one) breaks the protocol, and the worker is killed (``worker_broke_protocol``)."""
        w = self.workers.get(wid)
        if w is None or w.state == WorkerState.KILLED or self.phase == Phase.STOPPED:
            return self._take()   # late: what it held was answered when it was killed or stopped
        held = set(w.jobs)
        for item in items:
            if int(item["rid"]) not in held:
                return self.worker_broke_protocol(
                    wid, f"a result for job [{int(item['rid'])}], which it does not hold", now)
        per_doc_ms = time_ms / max(1, sum(i.get("docs", 0) for i in items if i.get("status") == 200))
        for item in items:
            rid = int(item["rid"])
            if rid in w.jobs:   # not twice: a second result for it in this message is dropped
                w.jobs.remove(rid)
            job = self.jobs.pop(rid, None)
            if job is None or job.answered:
                continue
            if item.get("status") == 200:
                self._release(job)
                docs = int(item.get("docs", 0))
                compute_ms = per_doc_ms * docs
                self.stats.computed_jobs += 1
                self.stats.record(now, self._wall_ms(now), docs, compute_ms, hit=False)
                self._out.append(Observe(job.dispatched - job.enqueued, compute_ms / 1000.0))
                if job.key is not None:
                    self.cache.put(job.key, (item["payload"], docs), int(item.get("nbytes", 0)))
                self._out.append(ReplyPayload(job.client, job.rid, item["payload"]))
            else:
                self._answer_error(job, ApiError(str(item.get("reason", "inference failed")),
                                                 status=int(item.get("status", 500))))
        if not w.jobs:
            if w.state == WorkerState.BUSY:
                self._move(w, WorkerState.IDLE, "answered")
            elif w.state == WorkerState.DRAINING:
                self._retire(w)
        if self.phase == Phase.STOPPING:
            self._tick(now)
        else:
            self._dispatch(now)  # the hot path: deadlines and reconciling wait for the periodic tick
        return self._take()

    def worker_broke_protocol(self, wid: str, reason: str, now: float) -> list[Command]:
        """A worker sent what the protocol does not allow (it runs model code, so it may): it is
        killed, and what it held is answered 500 now rather than left to its deadline."""
        w = self.workers.get(wid)
        if w is not None and w.state not in (WorkerState.KILLED, WorkerState.EXITED):
            self._kill_worker(w, f"it broke the worker protocol: {reason}")
        return self._take()

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, client: bytes, rid: int, payload: Payload, timeout_s: float, now: float, *,
               key: Optional[bytes] = None, dispatch: bool = True, nbytes: int = 0,
               config: Optional[dict[str, Any]] = None) -> list[Command]:
        """Queue a request (or answer it from the cache); a rejection raises its ApiError.
        ``key`` is the digest of the payload when the cache is on. ``dispatch=False`` leaves
        handing out work to a later ``dispatch``, so a burst of requests can share a batch.
        ``nbytes`` is the request's size on the wire: the bytes held for requests not yet
        answered have a budget, as their count has one. ``config``: the request's inference_config,
        passed to the worker with it (the key, when there is one, covers it)."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            raise self._stopping_error()
        if self.phase == Phase.FAILED:
            raise NotFound(f"deployment [{self.deployment_id}] has failed on node [{self.node_id}]: "
                           f"{self.reason}", retryable=True)
        self._check_relayable(len(payload), nbytes)
        if not self.cache.enabled:
            key = None
        elif key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                results, docs = cast(tuple[Payload, int], hit)
                self.stats.record(now, self._wall_ms(now), docs, 0.0, hit=True)
                self._out.append(ReplyPayload(client, rid, results))
                return self._take()
        self._admit(nbytes)
        self.held_bytes += nbytes
        self.queue.append(Job(client, rid, payload, now + timeout_s, now, key, nbytes=nbytes, config=config))
        if dispatch:
            self._dispatch(now)
        return self._take()

    def _check_relayable(self, frames: int, nbytes: int) -> None:
        """A request must fit one message to a worker on its own (a batch of one): else no
        worker could be handed it."""
        if 1 + frames > MAX_FRAMES:
            raise BadRequest(f"an inference request of [{frames}] payload frames cannot be relayed to an "
                             f"allocation worker: a message to a worker holds at most [{MAX_FRAMES}] "
                             "frames, a header and the request's payload frames")
        if BATCH_HEADER_BYTES + JOB_HEADER_BYTES + nbytes > MAX_BYTES:
            raise BadRequest(f"an inference request of [{nbytes}] bytes cannot be relayed to an "
                             f"allocation worker: a message to a worker holds at most [{MAX_BYTES}] "
                             f"bytes, the request's and [{BATCH_HEADER_BYTES + JOB_HEADER_BYTES}] "
                             "bytes of header")

    def _admit(self, nbytes: int) -> None:
        where = f"deployment [{self.deployment_id}] on node [{self.node_id}]"
        if self.a.target_allocations == 0:  # warm at zero (adaptive): the client must ask for one
            raise ServiceUnavailable(f"deployment [{self.deployment_id}] has no allocation on node "
                                     f"[{self.node_id}]", retryable=True)
        idle = sum(1 for w in self.workers.values() if w.state == WorkerState.IDLE)
        if len(self.queue) >= self.a.queue_capacity + idle:  # idle workers take theirs at dispatch
            self.stats.rejected_execution_count += 1
            raise TooManyRequests(
                f"inference process queue for {where} is full ({self.a.queue_capacity}). "
                "Unable to execute command", retry_after_ms=self.retry_after_ms())
        budget = self.limits.queue_max_bytes
        if self.held_bytes + nbytes > budget and (self.queue or self.jobs):
            self.stats.rejected_execution_count += 1
            raise TooManyRequests(
                f"inference process queue for {where} holds [{self.held_bytes}] bytes of requests; "
                f"this one ([{nbytes}] bytes) would pass its budget of [{budget}] bytes "
                "(--queue-max-bytes). Unable to execute command", retry_after_ms=self.retry_after_ms())

    def retry_after_ms(self) -> int:
        """When a slot is likely to free up: the queue ahead, served at the measured rate."""
        computed = self.stats.inference_count - self.stats.cache_hit_count
        per_doc_ms = (self.stats.compute_time_ms / computed) if computed else 10.0
        ready = max(1, self.ready_count())
        docs_per_job = computed / self.stats.computed_jobs if self.stats.computed_jobs else 1.0
        docs_ahead = max(1.0, len(self.queue) * docs_per_job)
        return max(1, int(docs_ahead * per_doc_ms / ready))

    def dispatch(self, now: float) -> list[Command]:
        self._dispatch(now)
        return self._take()

    def _dispatch(self, now: float) -> None:
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return
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
                    self._out.append(Schedule(due, Timer.BATCH))
                return
            jobs: list[tuple[int, Payload, Optional[dict[str, Any]]]] = []
            ids: list[int] = []
            frames, nbytes = 1, BATCH_HEADER_BYTES   # the batch's message on the worker's stream
            while self.queue and len(jobs) < batch:
                job = self.queue[0]
                if now >= job.deadline:
                    self.queue.popleft()
                    self._timeout(job)
                    continue
                frames += len(job.payload)
                nbytes += JOB_HEADER_BYTES + job.nbytes
                if jobs and (frames > MAX_FRAMES or nbytes > MAX_BYTES):
                    break   # the next batch takes it (alone, a request fits: _check_relayable)
                self.queue.popleft()
                job_id = next(self._ids)
                job.dispatched = now
                self.jobs[job_id] = job
                ids.append(job_id)
                jobs.append((job_id, job.payload, job.config))
                self.stats.queue_time_ms += (now - job.enqueued) * 1000
            if jobs:
                self.stats.batches += 1
                self.stats.batched_jobs += len(jobs)
                w.jobs = ids
                self._move(w, WorkerState.BUSY, "batch")
                self._out.append(SendWorker(w.identity, tuple(jobs)))

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
        self._out.append(Reply(job.client, job.rid, e.status, e.to_body()))

    def _fail_queue(self, e: ApiError) -> None:
        while self.queue:
            self._answer_error(self.queue.popleft(), e)

    # ---- reconcile --------------------------------------------------------------------------
    def tick(self, now: float) -> list[Command]:
        self._tick(now)
        return self._take()

    def needs_tick(self) -> bool:
        """Whether a periodic tick may do anything, now or later, before the next event: a
        deadline to watch (requests queued or running), workers to spawn, drain or retire, a stop
        in progress, a host to kill. When False, ``tick`` at any later time changes nothing and
        returns nothing, so the agent ticks only the deployments for which this holds."""
        if self.queue or self.jobs or self.phase == Phase.STOPPING or self.host_kill_at is not None:
            return True
        for w in self.workers.values():
            if w.jobs or w.state == WorkerState.DRAINING:
                return True
        return self.phase == Phase.RUNNING and len(self.live_workers()) != self.a.target_allocations

    def _tick(self, now: float) -> None:
        if (self.phase == Phase.LOADING and self.host_up and self._load_deadline is not None
                and now >= self._load_deadline):  # hung in native code, say: killed, and tried again
            self._load_deadline = None
            self._load_error = (f"the model host did not finish loading the model within "
                                f"[{self.limits.load_timeout_s:g}s] (--load-timeout)")
            self._out.append(KillHost())
        self._expire(now)
        self._cut_overruns(now)
        if self.phase == Phase.RUNNING:
            self._scale(now)
        for w in list(self.workers.values()):
            if w.state == WorkerState.DRAINING and not w.jobs:
                self._retire(w)
        if self.phase == Phase.STOPPING:
            self._stop_progress(now)
        if self.host_kill_at is not None and now >= self.host_kill_at and self.host_up:
            self._out.append(KillHost())
            self.host_kill_at = None
        self._dispatch(now)

    def _expire(self, now: float) -> None:
        """Deadlines: queued requests are dropped unrun; running ones are answered (result dropped)."""
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

    def _scale(self, now: float) -> None:
        """Wanted workers vs running ones: spawn the missing (after any restart backoff); drain the
        surplus, idle ones first, then those still starting, busy ones last."""
        live = self.live_workers()
        want = self.a.target_allocations
        if now >= self._respawn_at:
            for _ in range(want - len(live)):
                self._spawn_worker()
        if len(live) > want:
            order = sorted(live, key=lambda w: (w.state == WorkerState.BUSY,
                                                w.state != WorkerState.IDLE, w.worker_id))
            for w in order[: len(live) - want]:
                self._move(w, WorkerState.DRAINING, f"scaled down to {want}")

    def _stop_progress(self, now: float) -> None:
        if self.stop_deadline is not None and now >= self.stop_deadline:
            self._fail_queue(self._stopping_error())
            for w in list(self.workers.values()):
                if w.jobs:
                    self._kill_worker(w, f"the deployment was stopped and its stop grace "
                                         f"({self.limits.stop_grace_s:g}s) passed")
        if not self.queue and not self.jobs:
            for w in self.workers.values():
                if w.state != WorkerState.KILLED:
                    self._move(w, WorkerState.KILLED, "the deployment stopped")
            self._host_exit(now)
            if not self.host_up:
                self._set_phase(Phase.STOPPED)

    def _cut_overruns(self, now: float) -> None:
        """A forward pass past its request's deadline by ``overrun_grace_s`` is cut off: its worker
        is killed and replaced by a new fork of the warm host (the next tick spawns it)."""
        grace = self.limits.overrun_grace_s
        for w in list(self.workers.values()):
            if not w.jobs or w.state == WorkerState.KILLED:
                continue
            if any(j is not None and now >= j.deadline + grace for j in (self.jobs.get(i) for i in w.jobs)):
                self._kill_worker(w, f"a forward pass ran past its request's deadline by more than "
                                     f"{grace:g}s")

    def _kill_worker(self, w: Worker, why: str) -> None:
        self._log("warning", f"killing allocation worker {w.worker_id} (pid {w.pid}): {why}")
        for job_id in w.jobs:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._answer_error(job, ServerError(
                    f"allocation worker of deployment [{self.deployment_id}] on node [{self.node_id}] "
                    f"was killed while running this request: {why}"))
        w.jobs = []
        self._move(w, WorkerState.KILLED, why)
        self._host_cmd(HostCommand("kill", w.worker_id, force=True))

    def _retire(self, w: Worker) -> None:
        self._move(w, WorkerState.KILLED, "drained")
        self._out.append(StopWorker(w.identity))
        self._host_cmd(HostCommand("kill", w.worker_id))

    # ---- reports ----------------------------------------------------------------------------
    def routing_state(self) -> str:
        if self.phase in (Phase.FAILED, Phase.STOPPED, Phase.STOPPING):
            return str(self.phase.value)
        if self.phase == Phase.RUNNING and self.ready_count() > 0:
            return "started"
        return "starting"

    def pending_count(self) -> int:
        return len(self.queue) + sum(1 for j in self.jobs.values() if not j.answered)

    def report(self, now: float) -> dict[str, Any]:
        s = self.stats
        n = s.inference_count
        computed = n - s.cache_hit_count
        last_minute = s.last_minute(now)
        # a RouteReport, built as the map it travels as (m.encode's asdict would copy it again)
        return dict(
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
                   "number_of_pending_requests": self.pending_count(),
                   "throughput_last_minute": last_minute,
                   "peak_throughput_per_minute": s.peak_per_minute,
                   "cache_bytes": self.cache.used,
                   "average_batch_size": s.batched_jobs / s.batches if s.batches else 0.0,
                   "start_time": s.start_time_ms, "last_access": s.last_access_ms})

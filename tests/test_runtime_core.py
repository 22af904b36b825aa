"""The agent's per-deployment core (agent/core.py), driven with a fake clock and no processes:
events in, commands out."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlfleet.agent.core import (
    PHASE_MOVES,
    WORKER_MOVES,
    Command,
    DeploymentCore,
    HostCommand,
    IllegalTransition,
    KillHost,
    Limits,
    Phase,
    Reply,
    ReplyPayload,
    Schedule,
    SendWorker,
    StartHost,
    StopWorker,
    Timer,
    Worker,
    WorkerState,
)
from mlfleet.common import messages as m
from mlfleet.common import stream
from mlfleet.common.errors import ApiError
from mlfleet.common.protocol import MAX_PAYLOAD_FRAMES

pytestmark = pytest.mark.timeout(60)


def assignment(**kw: Any) -> m.NodeAssignment:
    base: dict[str, Any] = dict(deployment_id="d1", model_id="m1", sha256="a" * 64, model_bytes=1,
                                task="pass_through", threads_per_allocation=1, target_allocations=1,
                                queue_capacity=10, cache_size_bytes=0, priority="normal")
    return m.NodeAssignment(**{**base, **kw})


class Sim:
    """A core, a fake clock, and a record of what it answered and asked for."""

    def __init__(self, limits: Optional[Limits] = None, **kw: Any) -> None:
        self.now = 0.0
        self.core = DeploymentCore(assignment(**kw), node_id="n1", now=0.0, wall_ms=1_700_000_000_000,
                                   limits=limits, ids=itertools.count(1))
        self.answers: dict[int, list[int]] = {}   # client rid -> statuses, in order
        self.bodies: dict[int, Any] = {}
        self.sent: list[tuple[str, dict[str, Any]]] = []   # (worker id, message)
        self.host: list[dict[str, Any]] = []
        self.cmds: list[Command] = []

    def run(self, cmds: list[Command]) -> list[Command]:
        for c in cmds:
            if isinstance(c, Reply):
                self.answers.setdefault(c.rid, []).append(c.status)
                self.bodies[c.rid] = c.body
            elif isinstance(c, ReplyPayload):
                self.answers.setdefault(c.rid, []).append(200)
                self.bodies[c.rid] = c.payload
            elif isinstance(c, SendWorker):
                self.sent.append((c.identity.decode().split("|")[2], {"op": "infer", "jobs": c.jobs}))
            elif isinstance(c, StopWorker):
                self.sent.append((c.identity.decode().split("|")[2], {"op": "stop"}))
            elif isinstance(c, HostCommand):
                op, body = c.message()
                self.host.append({"cmd": op, **body})
        self.cmds += cmds
        return cmds

    def at(self, t: float) -> Sim:
        self.now = t
        return self

    def tick(self) -> list[Command]:
        return self.run(self.core.tick(self.now))

    def start(self) -> list[str]:
        """Fetched, loaded, and every spawned worker ready: their ids."""
        self.run(self.core.model_ready("/m.pt", None, self.now))
        self.run(self.core.host_loaded(self.now))
        wids = [w for w in self.core.workers]
        for wid in wids:
            self.run(self.core.worker_ready(wid, 100, self.now))
        return wids

    def submit(self, rid: int, docs: Optional[list[Any]] = None, timeout_s: float = 10.0,
               nbytes: int = 0, dispatch: bool = True) -> Optional[int]:
        """Submit; the status if it was rejected at once."""
        try:
            payload = tuple(d.encode() for d in (docs or [f"doc{rid}"]))  # opaque to the core
            key = b"|".join(payload) if self.core.cache.enabled else None
            self.run(self.core.submit(b"c", rid, payload, timeout_s, self.now, key=key,
                                      dispatch=dispatch, nbytes=nbytes))
        except ApiError as e:
            self.answers.setdefault(rid, []).append(e.status)
            self.bodies[rid] = e.to_body()
            return e.status
        return None

    def answer(self, wid: str, fail: bool = False) -> list[Command]:
        """The worker answers all it holds."""
        w = self.core.workers[wid]
        items = [{"rid": j, "status": 500, "reason": "boom"} if fail else
                 {"rid": j, "status": 200, "docs": 1, "payload": (b"[1]",), "nbytes": 3} for j in w.jobs]
        return self.run(self.core.worker_results(wid, items, 4.0, self.now))

    def spawned(self) -> list[str]:
        """The workers the host was asked to start, in order."""
        return [h["worker_id"] for h in self.host if h["cmd"] == "spawn"]

    def state(self, wid: str) -> WorkerState:
        return self.core.workers[wid].state

    def stats(self) -> dict[str, Any]:
        report: dict[str, Any] = self.core.report(self.now)["stats"]
        return report


# ---- the queue ---------------------------------------------------------------------------------
def test_queue_capacity_answers_429_with_retry_after() -> None:
    s = Sim(queue_capacity=2)
    s.start()
    assert s.submit(1) is None          # runs
    assert s.submit(2) is None and s.submit(3) is None   # queued: the queue is full
    assert s.submit(4) == 429
    assert "is full (2)" in s.bodies[4]["error"]["reason"]
    assert s.bodies[4]["error"]["retry_after_ms"] >= 1
    assert s.stats()["rejected_execution_count"] == 1
    assert s.stats()["number_of_pending_requests"] == 3


def test_byte_budget_answers_429_but_admits_one_large_request_alone() -> None:
    s = Sim(limits=Limits(queue_max_bytes=100))
    s.start()
    assert s.submit(1, nbytes=500) is None   # larger than the budget, but nothing else is held
    assert s.core.held_bytes == 500
    assert s.submit(2, nbytes=10) == 429
    assert "--queue-max-bytes" in s.bodies[2]["error"]["reason"]
    s.answer("w1")
    assert s.core.held_bytes == 0
    assert s.submit(3, nbytes=60) is None and s.submit(4, nbytes=30) is None
    assert s.submit(5, nbytes=20) == 429
    assert s.core.held_bytes == 90


def test_cache_hit_is_answered_from_the_cache() -> None:
    s = Sim(cache_size_bytes=1 << 20)
    s.start()
    s.submit(1, docs=["same"])
    s.answer("w1")
    s.submit(2, docs=["same"])
    assert s.answers[2] == [200] and s.bodies[2] == s.bodies[1]
    assert len(s.sent) == 1
    assert s.stats()["inference_cache_hit_count"] == 1 and s.stats()["inference_count"] == 2


# ---- batching ----------------------------------------------------------------------------------
def test_batches_by_size() -> None:
    s = Sim(max_batch_size=4)
    s.start()
    for rid in range(1, 7):
        s.submit(rid, dispatch=False)
    s.run(s.core.dispatch(s.now))
    assert [len(msg["jobs"]) for _, msg in s.sent] == [4]
    s.answer("w1")
    assert [len(msg["jobs"]) for _, msg in s.sent] == [4, 2]
    s.answer("w1")
    assert sorted(s.answers) == list(range(1, 7)) and all(v == [200] for v in s.answers.values())
    assert s.stats()["average_batch_size"] == 3.0


def test_batches_by_delay() -> None:
    s = Sim(max_batch_size=4, max_batch_delay_ms=50.0)
    s.start()
    s.submit(1)
    assert s.sent == [] and Schedule(0.05, Timer.BATCH) in s.cmds
    s.at(0.02).submit(2)
    assert s.sent == []
    s.at(0.05).run(s.core.timer(Timer.BATCH, s.now))
    assert [len(msg["jobs"]) for _, msg in s.sent] == [2]
    s.answer("w1")
    for rid in range(3, 7):   # a full batch goes at once
        s.submit(rid)
    assert [len(msg["jobs"]) for _, msg in s.sent] == [2, 4]


def test_idle_workers_share_what_waits() -> None:
    s = Sim(target_allocations=2, max_batch_size=8)
    s.start()
    for rid in range(1, 5):
        s.submit(rid, dispatch=False)
    s.run(s.core.dispatch(s.now))
    assert sorted((wid, len(msg["jobs"])) for wid, msg in s.sent) == [("w1", 2), ("w2", 2)]


def _frames(msg: dict[str, Any]) -> int:
    """The frames of a batch on the worker's stream: its header, then each job's payload."""
    return 1 + sum(len(payload) for _, payload, _ in msg["jobs"])


def test_a_batch_stays_within_the_worker_streams_frame_limit() -> None:
    """16 requests of MAX_PAYLOAD_FRAMES frames each would make a 65,553-frame message, past
    stream.MAX_FRAMES: the batch is cut at the last job that fits, the rest go next."""
    s = Sim(max_batch_size=16, queue_capacity=16)
    s.start()
    docs = ["x"] * MAX_PAYLOAD_FRAMES
    for rid in range(1, 17):
        assert s.submit(rid, docs=docs, dispatch=False) is None
    s.run(s.core.dispatch(s.now))
    assert [len(msg["jobs"]) for _, msg in s.sent] == [15]
    assert _frames(s.sent[0][1]) <= stream.MAX_FRAMES
    assert len(s.core.queue) == 1
    s.answer("w1")
    assert [len(msg["jobs"]) for _, msg in s.sent] == [15, 1]
    s.answer("w1")
    assert sorted(s.answers) == list(range(1, 17)) and all(v == [200] for v in s.answers.values())


def test_a_batch_stays_within_the_worker_streams_byte_limit() -> None:
    """Requests' bytes add up in one stream message: a batch stops before it would pass
    stream.MAX_BYTES, even below max_batch_size and with the queue's budget allowing more."""
    s = Sim(limits=Limits(queue_max_bytes=4 << 30), max_batch_size=8, target_allocations=1)
    s.start()
    big = 400 << 20
    for rid in range(1, 5):
        assert s.submit(rid, nbytes=big, dispatch=False) is None
    s.run(s.core.dispatch(s.now))
    assert [len(msg["jobs"]) for _, msg in s.sent] == [2]   # a third would be 1.2 GiB
    s.answer("w1")
    assert [len(msg["jobs"]) for _, msg in s.sent] == [2, 2]
    s.answer("w1")
    assert all(s.answers[rid] == [200] for rid in range(1, 5)) and s.core.held_bytes == 0


def test_a_request_too_large_for_the_worker_stream_alone_is_answered_400() -> None:
    """A request of up to MAX_PAYLOAD_FRAMES frames always fits a message's frame limit, but its
    bytes can pass stream.MAX_BYTES (frames of up to 64 MiB each; the queue budget admits one
    large request alone): it is refused at once, not handed to a worker that could not read it."""
    assert 1 + MAX_PAYLOAD_FRAMES <= stream.MAX_FRAMES   # the frame limit: one request always fits
    s = Sim(max_batch_size=4)
    s.start()
    assert s.submit(1, nbytes=stream.MAX_BYTES + 1) == 400
    reason = s.bodies[1]["error"]["reason"]
    assert f"[{stream.MAX_BYTES + 1}] bytes" in reason and f"[{stream.MAX_BYTES}]" in reason, reason
    assert s.sent == [] and s.core.held_bytes == 0 and not s.core.queue
    # the agent takes at most MAX_PAYLOAD_FRAMES; the core holds its own rule all the same
    assert s.submit(2, docs=["x"] * stream.MAX_FRAMES) == 400
    assert f"[{stream.MAX_FRAMES}] payload frames" in s.bodies[2]["error"]["reason"]
    assert f"at most [{stream.MAX_FRAMES}] frames" in s.bodies[2]["error"]["reason"]
    assert s.submit(3, docs=["x"] * MAX_PAYLOAD_FRAMES, nbytes=stream.MAX_BYTES // 2) is None
    assert [len(msg["jobs"]) for _, msg in s.sent] == [1]


# ---- a worker's results ------------------------------------------------------------------------
def test_a_result_for_a_job_the_worker_does_not_hold_breaks_the_protocol() -> None:
    """Workers run model code: one that answers another worker's job (or a guessed id) is killed
    and what it held is answered 500; the other worker's job is untouched."""
    s = Sim(target_allocations=2)
    s.start()
    s.submit(1)
    s.submit(2)
    held = {wid: list(s.core.workers[wid].jobs) for wid in ("w1", "w2")}
    assert all(len(v) == 1 for v in held.values())
    s.run(s.core.worker_results("w2", [{"rid": held["w1"][0], "status": 200, "docs": 1,
                                        "payload": (b"[1]",), "nbytes": 3}], 1.0, s.now))
    assert s.state("w2") == WorkerState.KILLED
    assert {"cmd": "kill", "worker_id": "w2", "force": True} in s.host
    w1_rid = s.core.jobs[held["w1"][0]].rid   # the client's request id of w1's job
    w2_rid = 3 - w1_rid
    assert s.answers[w2_rid] == [500] and "broke the worker protocol" in s.bodies[w2_rid]["error"]["reason"]
    assert w1_rid not in s.answers
    assert s.state("w1") == WorkerState.BUSY and s.core.workers["w1"].jobs == held["w1"]
    s.answer("w1")
    assert s.answers[w1_rid] == [200] and s.state("w1") == WorkerState.IDLE


def test_a_result_for_a_guessed_job_id_breaks_the_protocol() -> None:
    s = Sim()
    s.start()
    s.submit(1)
    s.run(s.core.worker_results("w1", [{"rid": 10_000, "status": 500, "reason": "x"}], 1.0, s.now))
    assert s.state("w1") == WorkerState.KILLED
    assert s.answers[1] == [500] and "[10000]" in s.bodies[1]["error"]["reason"]


def test_late_results_from_a_killed_worker_are_dropped() -> None:
    """A worker cut off past the overrun grace may still answer before it exits: its jobs were
    answered already, and its late message breaks nothing."""
    s = Sim(limits=Limits(overrun_grace_s=1.0))
    s.start()
    s.submit(1, timeout_s=1)
    rid = s.core.workers["w1"].jobs[0]
    s.at(2.5).tick()
    assert s.state("w1") == WorkerState.KILLED and s.answers[1] == [408]
    cmds = s.run(s.core.worker_results("w1", [{"rid": rid, "status": 200, "docs": 1,
                                               "payload": (b"[1]",), "nbytes": 3}], 1.0, s.now))
    assert s.answers[1] == [408] and not [c for c in cmds if isinstance(c, HostCommand)]


# ---- deadlines ---------------------------------------------------------------------------------
def test_queued_request_past_its_deadline_is_answered_408_and_never_run() -> None:
    s = Sim()
    s.start()
    s.submit(1, timeout_s=100)
    s.submit(2, timeout_s=1)
    s.at(1.0).tick()
    assert s.answers[2] == [408] and "timed out after [1s]" in s.bodies[2]["error"]["reason"]
    s.answer("w1")
    assert len(s.sent) == 1   # request 2 never reached a worker
    assert s.stats()["timeout_count"] == 1 and s.stats()["error_count"] == 0


def test_running_request_past_its_deadline_is_answered_408_then_the_overrun_is_cut_off() -> None:
    s = Sim(limits=Limits(overrun_grace_s=5.0))
    s.start()
    s.submit(1, timeout_s=1)
    s.at(1.0).tick()
    assert s.answers[1] == [408]
    assert s.state("w1") == WorkerState.BUSY   # still running: given the overrun grace
    s.at(6.0).tick()
    assert {"cmd": "kill", "worker_id": "w1", "force": True} in s.host
    assert s.state("w1") == WorkerState.KILLED
    w2 = s.spawned()[-1]
    assert w2 != "w1" and {"cmd": "spawn", "worker_id": w2, "identity": f"d1|n1|{w2}"} in s.host
    s.run(s.core.worker_exited("w1", -9, s.now))
    assert "w1" not in s.core.workers and not s.core.restarts   # a kill is no crash
    assert s.answers[1] == [408]   # answered once
    assert s.core.held_bytes == 0


# ---- restarts ----------------------------------------------------------------------------------
def test_restart_budget_backs_off_then_fails_the_route() -> None:
    s = Sim(limits=Limits(restart_budget=2, restart_window_s=60.0))
    s.start()
    s.submit(1)
    s.run(s.core.worker_exited("w1", -11, s.now))
    assert s.answers[1] == [500] and "killed by SIGSEGV" in s.bodies[1]["error"]["reason"]
    assert Schedule(0.1, Timer.TICK) in s.cmds
    s.at(0.05).tick()
    assert s.spawned() == ["w1"]             # still backing off
    s.at(0.1).tick()
    w2 = s.spawned()[-1]
    assert s.state(w2) == WorkerState.SPAWNING
    s.run(s.core.worker_exited(w2, 1, s.now))
    assert [c.at for c in s.cmds if isinstance(c, Schedule)][-1] == pytest.approx(0.3)   # 0.2 s now
    s.at(0.31).tick()
    assert len(s.spawned()) == 3
    s.submit(2)                                  # queued: no worker is ready
    s.run(s.core.worker_exited(s.spawned()[-1], 1, s.now))
    assert s.core.phase == Phase.FAILED and s.core.routing_state() == "failed"
    assert "exited 3 times in 60s; last: exited with code 1" in s.core.reason
    assert s.answers[2] == [500]
    assert {"cmd": "exit"} in s.host
    assert s.submit(3) == 404 and s.bodies[3]["error"].get("retryable") is True


def test_restarts_outside_the_window_are_forgotten() -> None:
    s = Sim(limits=Limits(restart_budget=1, restart_window_s=10.0))
    s.start()
    s.run(s.core.worker_exited("w1", 1, s.now))
    s.at(20.0).tick()
    s.run(s.core.worker_exited("w2", 1, s.now))
    assert s.core.phase == Phase.RUNNING and len(s.core.restarts) == 1


# ---- scaling -----------------------------------------------------------------------------------
def test_scale_down_drains_idle_first_then_starting_then_busy() -> None:
    s = Sim(target_allocations=2)
    s.start()
    s.submit(1)                                            # w1 busy, w2 idle
    s.run(s.core.update(assignment(target_allocations=3), s.now))
    w3 = s.spawned()[-1]
    assert s.state(w3) == WorkerState.SPAWNING
    s.run(s.core.update(assignment(target_allocations=2), s.now))
    assert "w2" in s.core.workers and s.state("w2") == WorkerState.KILLED   # idle: drained, stopped
    assert ("w2", {"op": "stop"}) in s.sent and {"cmd": "kill", "worker_id": "w2", "force": False} in s.host
    s.run(s.core.update(assignment(target_allocations=1), s.now))
    assert s.state(w3) == WorkerState.KILLED and s.state("w1") == WorkerState.BUSY
    s.run(s.core.update(assignment(target_allocations=0), s.now))
    assert s.state("w1") == WorkerState.DRAINING           # finishes what it holds
    s.answer("w1")
    assert s.answers[1] == [200] and s.state("w1") == WorkerState.KILLED
    for wid in ("w1", "w2", w3):
        s.run(s.core.worker_exited(wid, 0, s.now))
    assert s.core.workers == {} and not s.core.restarts and s.core.phase == Phase.RUNNING
    assert s.submit(2) == 503


def test_scale_up_spawns_the_missing_workers() -> None:
    s = Sim()
    s.start()
    s.run(s.core.update(assignment(target_allocations=3), s.now))
    assert [h["worker_id"] for h in s.host if h["cmd"] == "spawn"] == ["w1", "w2", "w3"]
    s.run(s.core.worker_ready("w2", 7, s.now))
    assert s.core.ready_count() == 2 and s.core.report(s.now)["current_allocations"] == 2
    s.tick()
    assert len(s.core.workers) == 3


# ---- stopping ----------------------------------------------------------------------------------
def test_stop_finishing_pending_work_drains_the_queue() -> None:
    s = Sim()
    s.start()
    s.submit(1)
    s.submit(2)
    s.run(s.core.begin_stop(True, s.now))
    assert s.core.routing_state() == "stopping" and 2 not in s.answers
    assert s.submit(3) == 409
    s.answer("w1")
    s.answer("w1")
    assert s.answers[1] == [200] and s.answers[2] == [200]
    assert {"cmd": "exit"} in s.host and s.core.phase == Phase.STOPPING
    s.run(s.core.host_exited(0, s.now))
    assert s.core.phase == Phase.STOPPED and s.core.workers == {}


def test_stop_without_finishing_answers_the_queue_409_and_gives_running_work_the_grace() -> None:
    s = Sim(limits=Limits(stop_grace_s=5.0))
    s.start()
    s.submit(1)
    s.submit(2)
    s.run(s.core.begin_stop(False, s.now))
    assert s.answers[2] == [409] and s.bodies[2]["error"].get("retryable") is True
    assert 1 not in s.answers and {"cmd": "exit"} not in s.host
    s.at(4.9).tick()
    assert 1 not in s.answers
    s.at(5.0).tick()
    assert s.answers[1] == [500] and "stop grace (5s) passed" in s.bodies[1]["error"]["reason"]
    assert {"cmd": "kill", "worker_id": "w1", "force": True} in s.host and {"cmd": "exit"} in s.host
    s.at(15.9).tick()
    assert not any(isinstance(c, KillHost) for c in s.cmds)
    s.at(16.0).tick()                  # the host did not exit in twice the grace (+1 s)
    assert any(isinstance(c, KillHost) for c in s.cmds)
    s.run(s.core.host_exited(-9, s.now))
    assert s.core.phase == Phase.STOPPED


def test_stop_before_the_host_runs_is_immediate() -> None:
    s = Sim()
    s.run(s.core.begin_stop(True, s.now))
    assert s.core.phase == Phase.STOPPED and s.cmds[-1:] != [HostCommand("exit")]


def test_a_failed_route_whose_host_is_gone_stops_at_once() -> None:
    s = Sim(limits=Limits(restart_budget=0))
    s.start()
    s.run(s.core.worker_exited("w1", 1, s.now))
    s.run(s.core.host_exited(0, s.now))
    assert s.core.phase == Phase.FAILED
    s.run(s.core.begin_stop(True, s.now))
    assert s.core.phase == Phase.STOPPED


def test_kill_answers_everything() -> None:
    s = Sim(queue_capacity=5)
    s.start()
    s.submit(1)
    s.submit(2)
    s.run(s.core.kill(s.now))
    assert s.answers == {1: [500], 2: [409]} and s.core.phase == Phase.STOPPED
    assert s.core.held_bytes == 0


# ---- loading -----------------------------------------------------------------------------------
def test_load_retries_back_off_then_fail_with_the_attempt_count() -> None:
    s = Sim(limits=Limits(load_retries=2))
    s.run(s.core.model_ready("/m.pt", "/tok.json", s.now))
    assert s.cmds[-1] == StartHost("/m.pt", "/tok.json", 1)
    for attempt, backoff in ((1, 0.5), (2, 1.0)):
        s.run(s.core.host_failed("could not load model: RuntimeError: bad", s.now))
        s.run(s.core.host_exited(2, s.now))
        assert s.cmds[-1] == Schedule(s.now + backoff, Timer.LOAD) and s.core.phase == Phase.LOADING
        s.at(s.now + backoff).run(s.core.timer(Timer.LOAD, s.now))
        assert s.cmds[-1] == StartHost("/m.pt", "/tok.json", attempt + 1)
    s.run(s.core.host_exited(-9, s.now))
    assert s.core.phase == Phase.FAILED
    assert s.core.reason == "could not load model: RuntimeError: bad (3 attempts)"


def test_a_host_that_does_not_finish_loading_in_time_is_killed_and_tried_again() -> None:
    s = Sim(limits=Limits(load_retries=1, load_timeout_s=60.0))
    s.run(s.core.model_ready("/m.pt", None, s.now))
    assert Schedule(60.0, Timer.TICK) in s.cmds  # the agent wakes the core at the deadline
    s.at(59.0).tick()
    assert not any(isinstance(c, KillHost) for c in s.cmds)
    s.at(60.0).run(s.core.timer(Timer.TICK, s.now))  # hung in native code, say
    assert isinstance(s.cmds[-1], KillHost)
    s.run(s.core.host_exited(-9, s.now))
    assert s.core.phase == Phase.LOADING  # a failed try: loaded again after its back-off
    s.at(s.now + 0.5).run(s.core.timer(Timer.LOAD, s.now))
    assert s.cmds[-1] == StartHost("/m.pt", None, 2)
    s.at(s.now + 60.0).run(s.core.timer(Timer.TICK, s.now))
    s.run(s.core.host_exited(-9, s.now))
    assert s.core.phase == Phase.FAILED
    assert s.core.reason == ("the model host did not finish loading the model within [60s] "
                             "(--load-timeout) (2 attempts)")


def test_a_host_that_loads_in_time_is_not_killed() -> None:
    s = Sim(limits=Limits(load_timeout_s=60.0))
    s.run(s.core.model_ready("/m.pt", None, s.now))
    s.at(30.0).run(s.core.host_loaded(s.now))
    s.at(61.0).run(s.core.timer(Timer.TICK, s.now))
    assert not any(isinstance(c, KillHost) for c in s.cmds) and s.core.phase == Phase.RUNNING


def test_a_loaded_host_starts_its_workers() -> None:
    s = Sim(target_allocations=2)
    s.run(s.core.model_ready("/m.pt", None, s.now))
    assert s.core.routing_state() == "starting"
    s.run(s.core.host_loaded(s.now))
    assert s.core.phase == Phase.RUNNING and len(s.core.workers) == 2
    assert s.core.routing_state() == "starting"
    s.run(s.core.worker_ready("w1", 5, s.now))
    assert s.core.routing_state() == "started"


# ---- the transition tables ---------------------------------------------------------------------
def test_a_bad_transition_is_rejected() -> None:
    s = Sim()
    s.start()
    w = s.core.workers["w1"]
    with pytest.raises(IllegalTransition, match="idle -> idle"):
        s.core._move(w, WorkerState.IDLE, "twice")
    s.core._move(w, WorkerState.KILLED, "test")
    with pytest.raises(IllegalTransition, match="killed -> busy"):
        s.core._move(w, WorkerState.BUSY, "test")
    assert w.state == WorkerState.KILLED and w.reason == "test"
    s.run(s.core.kill(s.now))
    with pytest.raises(IllegalTransition, match="stopped -> running"):
        s.core._set_phase(Phase.RUNNING)


def test_the_tables_cover_every_state_and_end_in_terminal_ones() -> None:
    assert set(WORKER_MOVES) == set(WorkerState) and set(PHASE_MOVES) == set(Phase)
    assert WORKER_MOVES[WorkerState.EXITED] == frozenset() and PHASE_MOVES[Phase.STOPPED] == frozenset()
    assert all(WorkerState.EXITED in v for k, v in WORKER_MOVES.items() if k != WorkerState.EXITED)
    assert Worker("w", b"w").state == WorkerState.SPAWNING


def test_report_shape() -> None:
    s = Sim()
    s.start()
    s.submit(1)
    s.at(0.5).answer("w1")
    r = s.core.report(s.now)
    assert set(r) == {"deployment_id", "routing_state", "current_allocations", "target_allocations",
                      "reason", "stats"}
    assert r["stats"]["inference_count"] == 1 and r["stats"]["last_access"] == 1_700_000_000_500
    assert r["stats"]["throughput_last_minute"] == 1


# ---- a property: any sequence of events -------------------------------------------------------
OPS = st.one_of(
    st.tuples(st.just("submit"), st.floats(0.05, 5.0), st.integers(0, 40)),
    st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
    st.tuples(st.just("tick")),
    st.tuples(st.just("dispatch")),
    st.tuples(st.just("answer"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("ready"), st.integers(0, 5)),
    st.tuples(st.just("exit"), st.integers(0, 5)),
    st.tuples(st.just("scale"), st.integers(0, 3)),
    st.tuples(st.just("stop"), st.booleans()),
    st.tuples(st.just("batch")),
)


def _check(s: Sim) -> None:
    core = s.core
    assert all(len(v) == 1 for v in s.answers.values()), s.answers
    assert core.held_bytes >= 0
    held = sum(j.nbytes for j in core.queue if not j.answered)
    held += sum(j.nbytes for j in core.jobs.values() if not j.answered)
    assert core.held_bytes == held
    if core.phase == Phase.RUNNING:
        assert len(core.live_workers()) <= core.a.target_allocations
    for w in core.workers.values():
        assert w.state != WorkerState.EXITED
        assert all(j in core.jobs for j in w.jobs)
        if w.jobs:
            assert w.state in (WorkerState.BUSY, WorkerState.DRAINING), w
        if w.state == WorkerState.BUSY:
            assert w.jobs, w


def _apply(s: Sim, op: tuple[Any, ...], rids: Iterator[int], dispatch: bool,
           **scale: Any) -> int | None:
    """One generated event on the simulated core; returns the request id of a ``submit``.
    ``dispatch``: whether a "dispatch" op runs; ``scale``: the assignment's fields on "scale"."""
    kind = op[0]
    wids = sorted(s.core.workers)
    if kind == "submit":
        rid = next(rids)
        s.submit(rid, timeout_s=op[1], nbytes=op[2])
        return rid
    if kind == "advance":
        s.now += op[1]
    elif kind == "tick":
        s.tick()
    elif kind == "dispatch" and dispatch:
        s.run(s.core.dispatch(s.now))
    elif kind == "batch":
        s.run(s.core.timer(Timer.BATCH, s.now))
    elif kind == "answer" and wids:
        s.answer(wids[op[1] % len(wids)], fail=op[2])
    elif kind == "ready" and wids:
        s.run(s.core.worker_ready(wids[op[1] % len(wids)], 1, s.now))
    elif kind == "exit" and wids:
        s.run(s.core.worker_exited(wids[op[1] % len(wids)], 1, s.now))
    elif kind == "scale":
        s.run(s.core.update(assignment(target_allocations=op[1], queue_capacity=4, **scale), s.now))
    elif kind == "stop":
        s.run(s.core.begin_stop(op[1], s.now))
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=60), st.integers(1, 3), st.integers(1, 4), st.integers(0, 30))
def test_any_sequence_of_events_answers_every_request_once(ops: list[tuple[Any, ...]], target: int,
                                                           batch: int, delay_ms: int) -> None:
    s = Sim(limits=Limits(queue_max_bytes=100, restart_budget=3), target_allocations=target,
            queue_capacity=4, max_batch_size=batch, max_batch_delay_ms=float(delay_ms))
    s.start()
    rids = itertools.count(1)
    submitted = []
    for op in ops:
        rid = _apply(s, op, rids, dispatch=True, max_batch_size=batch, max_batch_delay_ms=float(delay_ms))
        if rid is not None:
            submitted.append(rid)
        _check(s)
    # eventually: a stop past its grace, the host gone
    s.run(s.core.begin_stop(False, s.now))
    s.now += 100.0
    s.tick()
    s.run(s.core.host_exited(0, s.now))
    _check(s)
    assert s.core.phase == Phase.STOPPED
    assert sorted(s.answers) == submitted
    assert s.core.held_bytes == 0 and not s.core.queue and not s.core.jobs and not s.core.workers


def test_a_report_is_a_valid_route_report() -> None:
    """The report is built as a map for speed: it must still pass the RouteReport rules the
    coordinator checks it with."""
    s = Sim()
    s.start()
    s.submit(1)
    s.answer("w1")
    report = s.core.report(s.now)
    assert m.encode(m.decode(m.RouteReport, report, "deployments")) == report


def _snapshot(core: DeploymentCore) -> tuple[Any, ...]:
    return (core.phase, core.reason, core.held_bytes, core.host_kill_at, core.stop_deadline,
            core._respawn_at, core._batch_wake_at, len(core.queue), sorted(core.jobs),
            sorted((w.worker_id, w.state, tuple(w.jobs)) for w in core.workers.values()),
            core.stats.timeout_count, core.stats.inference_count)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=40), st.integers(1, 3), st.integers(0, 30))
def test_a_core_that_needs_no_tick_is_left_unchanged_by_ticks(ops: list[tuple[Any, ...]], target: int,
                                                               delay_ms: int) -> None:
    """The agent ticks only deployments whose core ``needs_tick``: for the others a tick, now or
    at any later time, must change nothing and ask for nothing."""
    s = Sim(limits=Limits(queue_max_bytes=100, restart_budget=3), target_allocations=target,
            queue_capacity=4, max_batch_delay_ms=float(delay_ms))
    s.start()
    rids = itertools.count(1)
    for op in ops:
        _apply(s, op, rids, dispatch=False, max_batch_delay_ms=float(delay_ms))
        if s.core.needs_tick():
            continue
        before = _snapshot(s.core)
        for later in (0.0, 0.05, 1.0, 30.0, 3600.0):
            twin = copy.deepcopy(s.core)
            assert twin.tick(s.now + later) == [], (later, before)
            assert _snapshot(twin) == before
    # a running deployment with its workers ready and nothing to do needs no tick
    s2 = Sim(target_allocations=1)
    s2.start()
    assert not s2.core.needs_tick()
    s2.submit(99)
    assert s2.core.needs_tick()

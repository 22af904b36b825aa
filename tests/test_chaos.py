"""Chaos: nothing takes a daemon down.

A real cluster (a coordinator and two agents on loopback, fast heartbeats) goes through a seeded,
random, bounded sequence of actions: starts (valid ones, bad values that must get 400, starts
beyond capacity that must get 429, a model that cannot load), updates (within and beyond
capacity), stops (with and without finish_pending_work), background inference load, SIGKILL of
allocation workers, of agents (restarted with the same node id and data dir) and of the
coordinator (restarted on the same address with the same data dir), and forward passes that
overrun their deadline. After every step the invariants are checked, each within a deadline:

* every daemon is alive (one that died on its own fails the test with its log tail), and every
  node is registered again after restarts;
* no deployment is lost (every one the test believes in is listed by get_stats, across
  coordinator restarts), none comes back after its stop, none is left by a rejected start;
* routing tables converge to the plan: each healthy deployment reaches its target allocations,
  every node serving it reports ``started``; a deployment of a model that cannot load is
  ``failed``;
* no orphan process: every model host and worker under an agent belongs to a deployment that
  exists, with as many workers per node as that node's allocations; an agent's hosts and
  workers die with it; hosts of healthy deployments survive a coordinator restart;
* every inference request is answered (a result or an ApiError) by its deadline plus a margin;
* no daemon log shows a fault caught inside the daemon (a traceback, an internal error).

The seed is printed (``chaos seed N``) and is in every failure message. Replay a failure::

    MLFLEET_CHAOS_SEED=N .venv/bin/python -m pytest tests/test_chaos.py -s

Run longer by hand (the pytest timeout follows MLFLEET_CHAOS_SECONDS)::

    MLFLEET_CHAOS_SEED=$RANDOM MLFLEET_CHAOS_SECONDS=900 .venv/bin/python -m pytest tests/test_chaos.py -s

Daemon logs are kept in the test's tmp dir (coordinator.log, node-a.log, node-b.log).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import pytest

from mlfleet.common.errors import ApiError, BadRequest, Conflict, RequestTimeout, ServerError, TooManyRequests
from tests.chaos_support import ChaosCluster, Load, alive, tail, wait_gone
from tests.helpers import Mlp, Slow, broken_torchscript, save_model, wait_until

DEFAULT_SEED = 0x5EED  # CI: the same choices every run
SEED = int(os.environ.get("MLFLEET_CHAOS_SEED", DEFAULT_SEED))
ACTION_S = float(os.environ.get("MLFLEET_CHAOS_SECONDS", "90"))
MAX_STEPS = int(os.environ.get("MLFLEET_CHAOS_MAX_STEPS", str(max(10, int(ACTION_S * 2)))))
NODES = {"node-a": 3, "node-b": 3}
CAPACITY = sum(NODES.values())
MAX_DEPLOYMENTS = 3          # model hosts load torch: keep a 2-core machine breathing
MAX_LOAD_THREADS = 4
MARGIN_S = 10.0              # an inference is answered by its deadline plus this
CONVERGE_S = 60.0            # routing tables reach the plan within this (model loads included)
AGENT = ["--overrun-grace", "1s", "--stop-grace", "2s", "--load-retries", "1"]

pytestmark = pytest.mark.timeout(int(ACTION_S) + 240)


@dataclass
class Dep:
    id: str
    model: str      # mlp | slow | broken
    target: int
    failing: bool = False


def _doc(model: str):
    if model == "slow":
        return lambda r: [{"input": np.array([0.01 + r.random() * 0.02], np.float32)}]
    return lambda r: [{"input": r.standard_normal((1, 8)).astype(np.float32)}]


def _bad_doc(r):
    return [{"input": np.array(["x"] * 8)}]


# (kwargs for start_deployment on model mlp, statuses that are right)
BAD_STARTS = [
    ({"number_of_allocations": 0}, {400}),
    ({"number_of_allocations": -3}, {400}),
    ({"number_of_allocations": float("nan")}, {400}),
    ({"number_of_allocations": 1.5}, {400}),
    ({"number_of_allocations": "two"}, {400}),
    ({"number_of_allocations": 10**12}, {400, 429}),
    ({"number_of_allocations": 2**64 - 1}, {400}),
    ({"number_of_allocations": 2**70}, {400}),  # more than msgpack holds: still a 400, not a crash
    ({"threads_per_allocation": 3}, {400}),
    ({"threads_per_allocation": 64}, {400}),
    ({"threads_per_allocation": float("inf")}, {400}),
    ({"queue_capacity": 0}, {400}),
    ({"queue_capacity": 10**7}, {400}),
    ({"queue_capacity": -1}, {400}),
    ({"priority": "urgent"}, {400}),
    ({"priority": "low", "number_of_allocations": 2}, {400}),
    ({"cache_size": "-1b"}, {400}),
    ({"cache_size": "lots"}, {400}),
    ({"cache_size": "99999999999999999999999pb"}, {400}),
    ({"timeout": float("nan")}, {400}),
    ({"timeout": float("inf")}, {400}),
    ({"timeout": -1.0}, {400}),
    ({"timeout": "0s"}, {400}),
    ({"timeout": "forever"}, {400}),
    ({"wait_for": "eventually"}, {400}),
    ({"max_batch_delay": float("nan")}, {400}),
    ({"max_batch_delay": "-5ms"}, {400}),
    ({"max_batch_size": 0}, {400}),
    ({"adaptive_allocations": {"enabled": True, "min_number_of_allocations": -1}}, {400}),
    ({"adaptive_allocations": {"enabled": True, "min_number_of_allocations": 3,
                               "max_number_of_allocations": 1}}, {400}),
    ({"adaptive_allocations": "yes"}, {400}),
    ({"deployment_id": ""}, {400}),
    ({"deployment_id": "Not A Valid Id!"}, {400}),
    ({"deployment_id": "x" * 5000}, {400}),
    ({"deployment_id": "slow"}, {400}),  # another model's id
]
BAD_UPDATES = [0, -1, float("nan"), float("inf"), "three", 2**64 - 1]


class Chaos:
    def __init__(self, workdir, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.workdir = workdir
        self.cc = ChaosCluster(workdir, NODES, AGENT)
        self.deps: dict[str, Dep] = {}
        self.stopping: set[str] = set()      # stopped by the coordinator itself: must go away
        self.gone: set[str] = set()          # stopped: must never come back
        self.rejected: set[str] = set()      # rejected starts: must not exist
        self.kills: dict[tuple[str, str], list[float]] = {}  # (dep, node) -> worker SIGKILL times
        self.history: list[str] = []
        self.step = 0
        self.n = 0
        self.load: Load | None = None
        self.admin = None
        self.infer_client = None
        self.t0 = time.monotonic()

    # ---- reporting ------------------------------------------------------------------------------
    def note(self, what: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] step {self.step}: {what}"
        self.history.append(line)
        print(line, flush=True)

    def ctx(self) -> str:
        return (f"chaos seed {self.seed} (replay: MLFLEET_CHAOS_SEED={self.seed} .venv/bin/python -m "
                f"pytest tests/test_chaos.py -s), step {self.step}, logs in {self.workdir}\n"
                "last steps:\n  " + "\n  ".join(self.history[-15:]) + "\n")

    def fail(self, msg: str) -> None:
        raise AssertionError(self.ctx() + msg)

    def expect(self, cond: bool, msg: str) -> None:
        if not cond:
            self.fail(msg)

    def refused(self, errors, what: str, fn, *args, **kw) -> ApiError:
        """``fn`` must raise one of ``errors``: success, another ApiError or anything else fails."""
        try:
            fn(*args, **kw)
        except errors as e:
            return e
        except ApiError as e:
            self.fail(f"{what}: got {e.status} {e.reason}")
        self.fail(f"{what} was accepted")
        raise AssertionError  # unreachable

    def wait(self, cond, timeout_s: float, what: str):
        try:
            return wait_until(cond, timeout_s, 0.1, what)
        except AssertionError as e:
            dead = self.cc.dead_daemons()
            self.fail(f"{e}\nlast problems seen: {self._last_problem}"
                      + ("\ndead daemons:\n" + "\n".join(dead) if dead else ""))

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        self.cc.start()
        self.admin = self.cc.c.client(request_timeout="20s")
        self.infer_client = self.cc.c.client(request_timeout="3s")
        self.load = Load(self.infer_client)
        w = self.workdir
        self.admin.put_model("mlp", save_model(Mlp(), w / "mlp.pt"))
        self.admin.put_model("slow", save_model(Slow(), w / "slow.pt"))
        self.admin.put_model("broken", broken_torchscript(w / "broken.pt"))

    def free(self) -> int:
        return CAPACITY - sum(d.target for d in self.deps.values())

    def healthy(self) -> list[Dep]:
        return [d for d in self.deps.values() if not d.failing]

    # ---- actions --------------------------------------------------------------------------------
    def act_start(self) -> None:
        if len(self.deps) >= MAX_DEPLOYMENTS:
            return self.act_bad_start()
        self.n += 1
        model = self.rng.choice(["mlp", "mlp", "slow"])
        dep_id = f"{model}-{self.n}"
        free = self.free()
        kw = {"deployment_id": dep_id, "timeout": "60s",
              "wait_for": self.rng.choice(["starting", "started", "fully_allocated"]),
              "queue_capacity": self.rng.choice([8, 64, 1024])}
        if model == "slow":
            kw["cache_size"] = "0b"
        else:
            kw["cache_size"] = self.rng.choice([None, "0b", "10kb"])
            if self.rng.random() < 0.3:
                kw.update(max_batch_size=4, max_batch_delay="20ms")
        if free == 0 or self.rng.random() < 0.15:
            n = free + self.rng.randint(1, 3)
            self.note(f"start {dep_id} ({model}) with {n} allocations, {free} free: expect 429")
            self.refused(TooManyRequests, f"a start of {n} allocations with {free} free",
                         self.admin.start_deployment, model, number_of_allocations=n, **kw)
            self.rejected.add(dep_id)
            return
        n = self.rng.randint(1, min(free, 3))
        self.note(f"start {dep_id} ({model}) with {n} allocations, {kw}")
        try:
            body = self.admin.start_deployment(model, number_of_allocations=n, **kw)
        except ApiError as e:
            self.fail(f"start of {dep_id} failed: {e.status} {e.reason}")
        self.expect(body["assignment"]["task_parameters"]["number_of_allocations"] == n, repr(body))
        self.deps[dep_id] = Dep(dep_id, model, n)

    def act_start_failing(self) -> None:
        if len(self.deps) >= MAX_DEPLOYMENTS or self.free() < 1:
            return self.act_bad_start()
        self.n += 1
        dep_id = f"broken-{self.n}"
        if self.rng.random() < 0.5:
            self.note(f"start {dep_id} (a model that cannot load), wait_for=started: expect 500")
            e = self.refused(ServerError, "a start of a model that cannot load",
                             self.admin.start_deployment, "broken", deployment_id=dep_id,
                             wait_for="started", timeout="90s")
            self.expect(e.status == 500 and "could not load model" in e.reason, repr(e))
            self.stopping.add(dep_id)  # the coordinator stops it itself
        else:
            self.note(f"start {dep_id} (a model that cannot load), wait_for=starting: expect a failed route")
            self.admin.start_deployment("broken", deployment_id=dep_id, wait_for="starting")
            self.deps[dep_id] = Dep(dep_id, "broken", 1, failing=True)

    def act_bad_start(self) -> None:
        kw, statuses = self.rng.choice(BAD_STARTS)
        kw = dict(kw)
        kw.setdefault("deployment_id", f"bad-{self.step}")
        self.note(f"bad start {_short(kw)}: expect {sorted(statuses)}")
        e = self.refused(ApiError, f"bad start {_short(kw)}", self.admin.start_deployment, "mlp", **kw)
        self.expect(e.status in statuses, f"bad start {_short(kw)}: got {e.status} {e.reason}")
        if isinstance(kw["deployment_id"], str) and kw["deployment_id"] not in self.deps:
            self.rejected.add(kw["deployment_id"])

    def act_update(self) -> None:
        r = self.rng.random()
        failing = [d for d in self.deps.values() if d.failing]
        if r < 0.15 and failing:
            d = self.rng.choice(failing)
            self.note(f"update {d.id} (failed) to 2 allocations: expect 409 (or 429)")
            self.refused((Conflict, TooManyRequests), "an update of a failed deployment",
                         self.admin.update_deployment, d.id, number_of_allocations=2)
            return
        healthy = self.healthy()
        if not healthy:
            return self.act_start()
        d = self.rng.choice(healthy)
        if r < 0.3:
            bad = self.rng.choice(BAD_UPDATES)
            self.note(f"update {d.id} with number_of_allocations={bad!r}: expect 400")
            self.refused(BadRequest, f"an update to {bad!r}", self.admin.update_deployment, d.id,
                         number_of_allocations=bad)
            return
        room = d.target + self.free()
        if r < 0.45:
            n = room + self.rng.randint(1, 3)
            self.note(f"update {d.id} {d.target} -> {n} allocations ({room} possible): expect 429")
            self.refused(TooManyRequests, "an update beyond capacity", self.admin.update_deployment,
                         d.id, number_of_allocations=n)
            return
        n = self.rng.randint(1, min(room, 4))
        self.note(f"update {d.id} {d.target} -> {n} allocations")
        try:
            body = self.admin.update_deployment(d.id, number_of_allocations=n)
        except ApiError as e:
            self.fail(f"update of {d.id} to {n} failed: {e.status} {e.reason}")
        self.expect(body["assignment"]["task_parameters"]["number_of_allocations"] == n, repr(body))
        d.target = n

    def act_stop(self) -> None:
        if not self.deps:
            return self.act_start()
        d = self.rng.choice(sorted(self.deps.values(), key=lambda d: d.id))
        fpw = self.rng.random() < 0.5
        self.note(f"stop {d.id} (finish_pending_work={fpw})")
        t = time.monotonic()
        body = self.admin.stop_deployment(d.id, finish_pending_work=fpw)
        self.expect(body == {"stopped": True}, repr(body))
        del self.deps[d.id]
        self.gone.add(d.id)
        self.note(f"stopped {d.id} in {time.monotonic() - t:.1f}s")

    def act_load(self) -> None:
        assert self.load is not None
        if self.load.running() >= MAX_LOAD_THREADS or not self.deps:
            return
        r = self.rng.random()
        if r < 0.1 and self.gone:
            dep_id, model = self.rng.choice(sorted(self.gone)), "mlp"
        else:
            d = self.rng.choice(sorted(self.deps.values(), key=lambda d: d.id))
            dep_id, model = d.id, d.model
        n = self.rng.randint(5, 60)
        timeout_s = self.rng.choice([1.0, 3.0, 5.0])
        doc = _bad_doc if r > 0.9 else _doc(model)
        self.note(f"load: {n} requests on {dep_id} with timeout {timeout_s:g}s"
                  + (" (bad documents)" if doc is _bad_doc else ""))
        self.load.start(dep_id, doc, n, timeout_s, self.step, self.rng.randrange(1 << 30))

    def act_kill_worker(self) -> None:
        owners = self.cc.worker_owners()
        now = time.monotonic()
        candidates = []
        for node, hosts in self.cc.tree().items():
            for workers in hosts.values():
                for w in workers:
                    dep_id = owners.get(w, ("?", ""))[0]
                    if dep_id not in self.deps or self.deps[dep_id].failing:
                        continue
                    recent = [t for t in self.kills.get((dep_id, node), []) if now - t < 65]
                    if len(recent) < 2:  # the restart budget is 3 a minute: stay under it
                        candidates.append((node, dep_id, w))
        if not candidates:
            return self.act_load()
        node, dep_id, pid = self.rng.choice(sorted(candidates))
        self.note(f"SIGKILL worker {pid} of {dep_id} on {node}")
        self.kills.setdefault((dep_id, node), []).append(now)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def act_kill_agent(self) -> None:
        node = self.rng.choice(sorted(NODES))
        self.note(f"SIGKILL agent {node}")
        pids = self.cc.kill_agent(node)
        self.kills = {k: v for k, v in self.kills.items() if k[1] != node}
        try:
            wait_gone(pids, 10, f"the model hosts and workers of {node} to die with it: {sorted(pids)}")
        except AssertionError as e:
            self.fail(str(e))
        self.cc.restart_agent(node)
        self.note(f"agent {node} restarted (pid {self.cc.agent(node).pid})")

    def act_kill_coordinator(self) -> None:
        owners = self.cc.worker_owners()
        keep = {h for hosts in self.cc.tree().values() for h, ws in hosts.items()
                if any(owners.get(w, ("?",))[0] in {d.id for d in self.healthy()} for w in ws)}
        self.note(f"SIGKILL coordinator (healthy model hosts {sorted(keep)})")
        self.cc.kill_coordinator()
        self.cc.restart_coordinator()
        self.note(f"coordinator restarted on {self.cc.endpoint} (pid {self.cc.coordinator.pid})")
        self.check()
        lost = sorted(h for h in keep if not alive(h))
        self.expect(not lost, f"healthy model hosts {lost} did not survive a coordinator restart")

    def act_overrun(self) -> None:
        slow = [d for d in self.healthy() if d.model == "slow"]
        if not slow:
            return self.act_start()
        d = self.rng.choice(slow)
        self.note(f"overrun: a 60s forward pass on {d.id} with a 1s timeout: expect 408")
        t = time.monotonic()
        try:
            self.infer_client.infer(d.id, [{"input": np.array([60.0], np.float32)}], timeout="1s")
            self.fail("a 60s forward pass finished within 1s")
        except RequestTimeout:
            pass
        except ApiError as e:
            self.fail(f"overrun answered {e.status} {e.reason}, not 408")
        took = time.monotonic() - t
        self.expect(took < 1 + MARGIN_S, f"the overrunning request was answered after {took:.1f}s")

    ACTIONS = [("start", 18), ("start_failing", 5), ("bad_start", 8), ("update", 14), ("stop", 9),
               ("load", 16), ("kill_worker", 9), ("kill_agent", 5), ("kill_coordinator", 5),
               ("overrun", 5)]

    def run(self) -> None:
        names, weights = zip(*self.ACTIONS, strict=True)
        end = self.t0 + ACTION_S
        while time.monotonic() < end and self.step < MAX_STEPS:
            self.step += 1
            action = self.rng.choices(names, weights)[0]
            try:
                getattr(self, f"act_{action}")()
                self.check()
            except AssertionError:
                raise
            except Exception as e:
                self.fail(f"{action} raised {type(e).__name__}: {e}")

    # ---- invariants -----------------------------------------------------------------------------
    def check(self) -> None:
        dead = self.cc.dead_daemons()
        self.expect(not dead, "daemons died on their own:\n" + "\n".join(dead))
        self.wait(lambda: set(self.admin.get_nodes()["nodes"]) == set(NODES), 20, "every node registered")

        def listed() -> dict[str, dict]:
            return {e["deployment_stats"]["deployment_id"]: e["deployment_stats"]
                    for e in self.admin.get_stats()["trained_model_stats"]}

        stats = self.wait(lambda: (listed(),), 20, "get_stats")[0]
        missing = sorted(set(self.deps) - set(stats))
        self.expect(not missing, f"deployments lost: {missing}; listed: {sorted(stats)}")
        back = sorted((self.gone | self.rejected) & set(stats))
        self.expect(not back, f"stopped or rejected deployments listed: {back}")
        unknown = sorted(set(stats) - set(self.deps) - self.stopping)
        self.expect(not unknown, f"deployments nobody started: {unknown}")
        if self.stopping:
            self.wait(lambda: not (self.stopping & set(listed())), 60,
                      f"deployments stopped by the coordinator to go: {sorted(self.stopping)}")
            self.gone |= self.stopping
            self.stopping = set()
        self._last_problem = []
        self.wait(self._converged, CONVERGE_S, "routing tables to converge to the plan")
        self.wait(lambda: not (p := self._orphans()) or self._remember(p), 30, "no orphan process")
        self._check_requests()
        bad = self.cc.bad_log_lines()
        self.expect(not bad, "faults in the daemon logs:\n" + "\n".join(bad[:5]))

    _last_problem: list[str] = []

    def _remember(self, problems: list[str]) -> bool:
        self._last_problem = problems
        return False

    def _converged(self) -> bool:
        stats = {e["deployment_stats"]["deployment_id"]: e["deployment_stats"]
                 for e in self.admin.get_stats()["trained_model_stats"]}
        problems = []
        for d in self.deps.values():
            ds = stats.get(d.id)
            if ds is None:
                problems.append(f"{d.id} not listed")
                continue
            if d.failing:
                if ds["state"] != "failed":
                    problems.append(f"{d.id} is {ds['state']}, not failed")
                continue
            a = ds["allocation_status"]
            routes = {next(iter(n["node"])): (n["routing_state"]["routing_state"], n["number_of_allocations"])
                      for n in ds["nodes"]}
            if (a["allocation_count"], a["target_allocation_count"]) != (d.target, d.target) or any(
                    n > 0 and s != "started" for s, n in routes.values()):
                problems.append(f"{d.id}: {a} routes {routes}")
        self._last_problem = problems
        return not problems

    def _orphans(self) -> list[str]:
        stats = {e["deployment_stats"]["deployment_id"]: e["deployment_stats"]
                 for e in self.admin.get_stats()["trained_model_stats"]}
        owners = self.cc.worker_owners()
        problems = []
        for node, hosts in self.cc.tree().items():
            on_node = {dep_id: n for dep_id, ds in stats.items() for n in ds["nodes"] if node in n["node"]}
            if len(hosts) > len(on_node):
                problems.append(f"{node}: {len(hosts)} model hosts for {len(on_node)} deployments "
                                f"{sorted(on_node)}")
            count: dict[str, int] = {}
            for host, workers in hosts.items():
                for w in workers:
                    dep_id, _ = owners.get(w, ("?", ""))
                    if dep_id not in stats:
                        problems.append(f"{node}: worker {w} (host {host}) of {dep_id}, not a deployment")
                    count[dep_id] = count.get(dep_id, 0) + 1
            for d in self.healthy():
                want = on_node[d.id]["number_of_allocations"] if d.id in on_node else 0
                if count.get(d.id, 0) != want:
                    problems.append(f"{node}: {count.get(d.id, 0)} workers of {d.id}, {want} allocations")
        return problems

    def _check_requests(self) -> None:
        assert self.load is not None
        now = time.monotonic()
        for r in self.load.snapshot():
            late = r.late_by(now, MARGIN_S)
            if late > 0:
                state = f"answered {r.outcome!r} after {r.t1 - r.t0:.1f}s" if r.t1 else "still unanswered"
                self.fail(f"a request on {r.dep} (sent at step {r.step}, timeout {r.timeout_s:g}s) "
                          f"{state}: past its deadline plus {MARGIN_S:g}s")
            if r.t1 is not None and r.outcome is not True:
                e = r.outcome
                if not isinstance(e, ApiError):
                    self.fail(f"a request on {r.dep} raised {type(e).__name__}: {e} (not an ApiError)")
                if "internal error" in e.reason:
                    self.fail(f"a request on {r.dep} got {e.status} {e.reason}")

    # ---- teardown -------------------------------------------------------------------------------
    def finish(self) -> None:
        self.step += 1
        self.note(f"finish: stop {sorted(self.deps)}")
        for dep_id in sorted(self.deps):
            self.admin.stop_deployment(dep_id)
            self.gone.add(dep_id)
        self.deps.clear()
        assert self.load is not None
        hung = self.load.join(60)
        self.expect(not hung, f"load threads still running: {hung}")
        self.check()
        self.wait(lambda: all(not hosts for hosts in self.cc.tree().values()), 30,
                  "no model host left once every deployment stopped")
        recs = self.load.snapshot()
        errors: dict[str, int] = {}
        for r in recs:
            if r.outcome is not True:
                key = f"{getattr(r.outcome, 'status', '?')} {type(r.outcome).__name__}"
                errors[key] = errors.get(key, 0) + 1
        self.note(f"{len(recs)} requests, {sum(1 for r in recs if r.outcome is True)} served, "
                  f"errors {errors}; restarts {self.cc.restarts}")

    def close(self) -> list[int]:
        for c in (self.admin, self.infer_client):
            if c is not None:
                c.close()
        return self.cc.shutdown()


def _short(kw: dict) -> str:
    return "{" + ", ".join(f"{k}={(repr(v)[:40])}" for k, v in kw.items()) + "}"


def test_chaos(tmp_path):
    print(f"chaos seed {SEED}", flush=True)
    chaos = Chaos(tmp_path, SEED)
    ok = False
    try:
        chaos.setup()
        chaos.check()
        chaos.run()
        chaos.finish()
        ok = True
    finally:
        if not ok:
            for d in chaos.cc.daemons() if chaos.cc.c.coordinator else chaos.cc.c.agents.values():
                print(f"---- {d.name} log tail ----\n{tail(d.log, 3000)}")
        leftovers = chaos.close()
    assert not leftovers, f"chaos seed {SEED}: processes outlived their daemons: {leftovers}"

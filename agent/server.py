"""The agent daemon. One thread, one poll loop over:

* a DEALER to the coordinator (register, heartbeats carrying route reports and stats; the
  coordinator pushes ``sync`` with the node's wanted assignments),
* a second DEALER to the coordinator for bulk transfer only (model chunks), so that heartbeat
  and registration replies never wait behind megabytes of model on one connection,
* the inference ROUTER clients send to directly,
* the AF_UNIX stream socket its allocation workers connect to (agent/links.py),
* the stdout pipes of its model hosts.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import signal
import socket as pysocket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from mlfleet.agent import heartbeat
from mlfleet.agent.config import AgentConfig
from mlfleet.agent.links import WorkerLinks
from mlfleet.agent.modelcache import ModelCache
from mlfleet.agent.runtime import DeploymentRuntime, Phase
from mlfleet.common import messages as m
from mlfleet.common.clock import Clock
from mlfleet.common.errors import ApiError, BadRequest, NotFound, ServerError
from mlfleet.common.offload import Offload
from mlfleet.common.proc import sd_notify, watchdog_interval_s, write_ready_file
from mlfleet.common.protocol import (
    OP_LIMITS,
    Buffer,
    EnvelopeError,
    Reply,
    decode_message,
    decode_request,
    encode_reply,
    encode_request,
    pack,
    payload_key,
    payload_size,
    peek_request,
)
from mlfleet.common.security import Curve, authorize, load_public, load_secret, start_authenticator
from mlfleet.common.zmqutil import (
    ROUTING_ID_CHOSEN,
    Timers,
    assigned_routing_id,
    bind,
    make_socket,
    recv_frames,
    send_frames,
)

log = logging.getLogger(__name__)
# plain ints: pyzmq's flag enums cost an Enum construction per `|`
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
# What the agent takes from the coordinator's sync for its own timing.
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S, MAX_NODE_TIMEOUT_S = 0.01, 3600.0, 7 * 86400.0
_ASSIGNMENT_FIELDS = frozenset(f.name for f in dataclasses.fields(m.NodeAssignment))


def _known_fields(raw: Any) -> Any:
    """An assignment without the fields this agent does not know: a newer coordinator may add
    fields to a body without a new protocol version (docs/protocol.md §2)."""
    if isinstance(raw, dict) and not raw.keys() <= _ASSIGNMENT_FIELDS:
        return {k: v for k, v in raw.items() if k in _ASSIGNMENT_FIELDS}
    return raw


class Agent:
    def __init__(self, cfg: AgentConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self.node_id = cfg.node_id
        self.data_dir = Path(cfg.data_dir or f"./mlfleet-data/agent-{cfg.node_id}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = zmq.Context.instance()
        self.infer_sock = make_socket(self.ctx, zmq.ROUTER)
        self.curve: Curve | None = None
        self.auth = None
        self.client_keys: dict[str, str] = {}
        if cfg.curve_secret_key:
            if not cfg.coordinator_public_key:
                raise ValueError("--curve-secret-key needs --coordinator-public-key")
            self.curve = Curve(*load_secret(cfg.curve_secret_key), load_public(cfg.coordinator_public_key))
            self.auth = start_authenticator(self.ctx)
            self.curve.server(self.infer_sock)
        self.coord: zmq.Socket | None = None
        self.run_dir = tempfile.mkdtemp(prefix="mlfleet-agent-")  # mode 0700: ours alone
        self.worker_endpoint = f"{self.run_dir}/workers.sock"
        self.poller = zmq.Poller()
        self.workers = WorkerLinks(self.worker_endpoint, self.poller, self._on_worker, self._authorize_worker,
                                   clock=self.clock.monotonic)
        self.endpoint = ""
        self.advertise = ""
        self.timers = Timers(self.clock.monotonic)
        self.bulk: zmq.Socket | None = None  # model chunks only (docs/protocol.md §9.3)
        self.bulk_token: str | None = None    # from the register reply; None: chunks go on coord
        self.runtimes: dict[str, DeploymentRuntime] = {}
        # Work per turn follows what changed, not the number of deployments: only deployments
        # with an event since their core last needed no tick are ticked (and, once stopped,
        # reaped); host pipes are (un)registered as their hosts start and end; each report is
        # kept encoded until it changes (agent/heartbeat.py).
        self._active: dict[DeploymentRuntime, None] = {}
        self._host_changes: dict[DeploymentRuntime, None] = {}
        self._fd_of: dict[DeploymentRuntime, int] = {}
        self._host_fds: dict[int, DeploymentRuntime] = {}
        self.report_cache = heartbeat.ReportCache()
        self.sync_memo = heartbeat.SyncMemo()
        self._sync_applied: tuple[dict, frozenset[str]] | None = None  # the last sync body applied
        self.routing_versions: dict[str, int] = {}
        self.pending: dict[int, Callable[[int, dict], None]] = {}
        self._ids = itertools.count(1)
        self.registered = False
        self.last_heard = self.clock.monotonic()
        self.heartbeat_interval_s = 1.0
        self.node_timeout_s = 10.0
        self._last_heartbeat = 0.0
        self._submitted: set[DeploymentRuntime] = set()
        self._running = False
        self._leave_requested = False
        self._refetch = False
        self._leaving_since: float | None = None
        self.loop_errors = 0  # faults caught in the loop (logged with their tracebacks)
        self.offload = Offload(2, "mlfleet-agent-io")  # hashing and chunk writes, off the loop
        self.models = ModelCache(self.data_dir / "models", self._request_chunk, self.offload,
                                 clock=self.clock.monotonic)
        cpus = psutil.cpu_count(logical=True) or 1
        self.allocated_processors = cfg.allocated_processors or cpus
        self.metrics = None
        if cfg.metrics_listen:
            from mlfleet.common.metrics import Metrics
            self.metrics = Metrics()

    # ---- lifecycle -----------------------------------------------------------------------------
    def check_sandbox(self) -> None:
        """Models run in a sandbox (Landlock and a seccomp filter, see agent/sandbox.py); where the
        kernel lacks them, warn, or with --require-sandbox refuse to start."""
        from mlfleet.agent import sandbox
        info = sandbox.probe()
        missing = [name for name, ok in (("Landlock", info["landlock_abi"]),
                                         ("seccomp filters", info["seccomp_filter"])) if not ok]
        if missing and self.cfg.require_sandbox:
            raise ValueError(f"this kernel lacks {' and '.join(missing)}: models cannot be sandboxed, "
                             "and --require-sandbox is set")
        if missing:
            log.warning("this kernel lacks %s: models will run without that part of their sandbox "
                        "(--require-sandbox refuses to start instead)", " and ".join(missing))
        else:
            log.info("models run sandboxed: Landlock ABI %d and a seccomp filter", info["landlock_abi"])

    def bind(self) -> str:
        self.check_sandbox()
        self.endpoint = bind(self.infer_sock, self.cfg.listen)
        self.advertise = self.cfg.advertise or self.endpoint
        self.workers.bind()
        if self.metrics is not None:
            log.info("agent [%s] metrics on %s", self.node_id, self.metrics.serve(
                self.cfg.metrics_listen, tls_cert=self.cfg.metrics_tls_cert,
                tls_key=self.cfg.metrics_tls_key, basic_auth=self.cfg.metrics_basic_auth))
        self._connect_coordinator()
        log.info("agent [%s] serving inference on %s (advertised %s), %d allocated processors, "
                 "coordinator %s", self.node_id, self.endpoint, self.advertise,
                 self.allocated_processors, self.cfg.coordinator)
        return self.endpoint

    def _connect_coordinator(self) -> None:
        for old in (self.coord, self.bulk):
            if old is not None:
                self.poller.unregister(old)
                old.close(0)
        # no routing id of our own: the coordinator's ROUTER picks one, and our registration
        # (with our key) binds it to our node id; a peer cannot squat a name we use. The bulk
        # connection is authenticated the same way (same keys) and its requests carry the token
        # our registration was given.
        self.coord, self.bulk = (make_socket(self.ctx, zmq.DEALER) for _ in range(2))
        for sock in (self.coord, self.bulk):
            if self.curve is not None:
                self.curve.client(sock)
            sock.connect(self.cfg.coordinator)
            self.poller.register(sock, zmq.POLLIN)
        self.bulk_token = None
        self.pending.clear()
        self._refetch = True  # once registered, fetches in flight ask again for what they await
        self.registered = False
        self.last_heard = self.clock.monotonic()
        self._register()

    def run(self) -> None:
        if not self.endpoint:
            self.bind()
        self.poller.register(self.infer_sock, zmq.POLLIN)
        self.poller.register(self.offload.fd, zmq.POLLIN)
        self.timers.every(0.1, self._tick)
        self.timers.every(0.05, self._maybe_heartbeat)
        self.timers.every(1.0, lambda: self.workers.tick(self.clock.monotonic()))  # silent streams, fds
        self._running = True
        if self.metrics is not None:
            self.timers.every(1.0, self._publish_metrics)
        if self.cfg.ready_file:
            write_ready_file(self.cfg.ready_file, self.advertise,
                             **({"metrics": self.metrics.url} if self.metrics else {}))
        sd_notify("READY=1")
        if (wd := watchdog_interval_s()) is not None:  # fed from the loop: a stuck loop stops feeding
            self.timers.every(wd, lambda: sd_notify("WATCHDOG=1"))
        try:
            while self._running:
                self._guarded("poll", self._loop_once)
        finally:
            self.close()

    def _on_event(self, rt: DeploymentRuntime) -> None:
        """An event reached ``rt``: it is ticked until its core needs no tick."""
        self._active[rt] = None

    def _hosts_changed(self, rt: DeploymentRuntime) -> None:
        """``rt``'s model host started or its pipe closed: its fd and reaping are due."""
        self._host_changes[rt] = None

    def _update_host_fds(self) -> None:
        """The poller follows the host pipes that changed (all removals before additions: a
        closed pipe's fd number may already be a new host's)."""
        changed, self._host_changes = self._host_changes, {}
        for rt in changed:
            fd = self._fd_of.pop(rt, None)
            if fd is not None and self._host_fds.get(fd) is rt:
                del self._host_fds[fd]
                self.poller.unregister(fd)
        for rt in changed:
            fd = rt.host_fd() if self.runtimes.get(rt.deployment_id) is rt else None
            if fd is not None:
                self._fd_of[rt] = fd
                self._host_fds[fd] = rt
                self.poller.register(fd, zmq.POLLIN)

    def _loop_once(self) -> None:
        # Work per turn does not grow with the deployments on the node (see __init__).
        if self._host_changes:
            self._guarded("reaping stopped deployments", self._reap_stopped)
            self._update_host_fds()
        host_fds = self._host_fds
        polled = self.poller.poll(self.timers.timeout_ms(100))
        workers = self.workers
        for fd, ev in polled:  # workers and hosts first: answers free workers for what comes in
            if workers.handles(fd):
                workers.on_event(fd, ev)
            elif (rt := host_fds.get(fd) if isinstance(fd, int) else None) is not None:
                self._guarded(f"model host of [{rt.deployment_id}]", rt.on_host_readable)
        events = dict(polled)
        if self.coord in events:
            self._drain(self.coord, self._on_coordinator)
        if self.infer_sock in events:
            self._drain_clients()
        if self.offload.fd in events:
            self.offload.run_done()
        if self.bulk in events:  # model chunks: after what is waiting for us
            self._drain(self.bulk, self._on_bulk)
        self.timers.run_due()
        if self._leave_requested:
            self._guarded("leaving", self._leave)

    def _guarded(self, what: str, fn: Callable[[], Any]) -> None:
        """No exception escapes the loop: a fault is logged with its traceback and counted, and
        the daemon goes on."""
        try:
            fn()
        except Exception:
            self.loop_errors += 1
            log.exception("agent: %s failed; carrying on", what)

    def stop(self, *_: Any) -> None:
        """SIGTERM/SIGINT: leave cleanly (see ``_leave``); a second signal exits at once."""
        if self._leave_requested:
            self._running = False
        self._leave_requested = True

    def _leave(self) -> None:
        """Tell the coordinator we leave (our routes go first, our allocations are planned
        elsewhere), stop every deployment (queued requests are answered with a retryable 409,
        running ones get --stop-grace), then exit once they have stopped."""
        now = self.clock.monotonic()
        if self._leaving_since is None:
            self._leaving_since = now
            log.info("agent [%s] leaving: stopping %d deployments", self.node_id, len(self.runtimes))
            if self.registered:
                self._request("leave", {"node_id": self.node_id})
            for rt in self.runtimes.values():
                if rt.phase not in (Phase.STOPPING, Phase.STOPPED):
                    rt.begin_stop(finish_pending_work=False)
        all_stopped = all(rt.phase == Phase.STOPPED for rt in self.runtimes.values())
        if all_stopped or now > self._leaving_since + 2 * self.cfg.stop_grace_s + 2.0:
            self._running = False

    def close(self) -> None:
        self.models.abort_all("the agent is stopping")
        self.offload.close()
        if self.bulk is not None:
            self.bulk.close(0)
        for rt in self.runtimes.values():
            rt.kill()
        for rt in self.runtimes.values():
            rt.wait_host(self.cfg.stop_grace_s)
        self.workers.close()
        for s in (self.infer_sock, self.coord):
            if s is not None:
                s.close(0)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.metrics is not None:
            self.metrics.close()
        if self.auth is not None:
            self.auth.stop()
        log.info("agent [%s] stopped", self.node_id)

    def _drain_clients(self) -> None:
        self._submitted: set[DeploymentRuntime] = set()
        try:
            self._drain_clients_burst()
        finally:
            for rt in self._submitted:  # one hand-out per burst: queued requests share batches
                rt.dispatch()

    def _drain_clients_burst(self) -> None:
        sock = self.infer_sock
        for _ in range(256):
            if not sock.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a zmq.Again per burst
                return
            raw = recv_frames(sock)
            user = None
            if self.curve is not None:
                try:
                    user = raw[1].get("User-Id") if len(raw) > 1 else None
                except zmq.ZMQError:
                    user = None
            try:
                self._on_client(raw[0].bytes, raw[1:], user)
            except Exception:
                log.exception("failed to handle a client message")

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[Any]], None], copy: bool = True) -> None:
        for _ in range(256):
            if not sock.getsockopt(_EVENTS) & _POLLIN:  # pyzmq's Again costs microseconds to raise
                return
            frames = sock.recv_multipart(_NOBLOCK, copy=copy)
            try:
                handle(frames)
            except Exception:
                log.exception("failed to handle a message")

    # ---- coordinator ---------------------------------------------------------------------------
    def _request(self, op: str, body: dict, on_reply: Callable[[int, dict], None] | None = None,
                 sock: zmq.Socket | None = None) -> None:
        rid = next(self._ids)
        if on_reply is not None:
            self.pending[rid] = on_reply
        try:
            (sock or self.coord).send(encode_request(op, rid, body), zmq.NOBLOCK)
        except zmq.Again:
            self.pending.pop(rid, None)
            log.warning("coordinator queue full; dropped [%s]", op)

    def _request_chunk(self, sha256: str, offset: int, length: int, cb: Callable) -> None:
        """Model bytes on the bulk connection, naming our node and our registration's token. Not
        registered: not sent (the model cache asks again once we are, ``on_reconnect``). A
        coordinator that gave no token takes them on the main connection."""
        if not self.registered:
            return
        body = {"sha256": sha256, "offset": offset, "length": length}
        if self.bulk_token is None:
            self._request("model_chunk", body, cb)
        else:
            self._request("model_chunk", {**body, "node_id": self.node_id, "bulk_token": self.bulk_token},
                          cb, self.bulk)

    def _reports(self) -> list[dict]:
        return [rt.report() for rt in self.runtimes.values()]

    def _memory(self) -> dict:
        vm = psutil.virtual_memory()
        return {"total_bytes": vm.total, "available_bytes": vm.available}

    def _register(self) -> None:
        self._request("register", m.encode(m.Register(
            node_id=self.node_id, hostname=pysocket.gethostname(), transport_address=self.advertise,
            allocated_processors=self.allocated_processors,
            cpu={"physical": psutil.cpu_count(logical=False) or 1,
                 "logical": psutil.cpu_count(logical=True) or 1},
            memory=self._memory(), pid=os.getpid(), deployments=self._reports())), self._on_register_reply)

    def _send_heartbeat(self) -> None:
        """A Heartbeat, written around each deployment's report kept encoded until it changes
        (agent/heartbeat.py; ``m.encode``'s dataclasses.asdict would deep-copy every report)."""
        rid = next(self._ids)
        self.pending[rid] = self._on_sync_reply
        frame = self.report_cache.heartbeat(rid, self.node_id, self._memory(), self.runtimes.values(),
                                            self.clock.monotonic())
        try:
            self.coord.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.pending.pop(rid, None)
            log.warning("coordinator queue full; dropped [heartbeat]")

    def _maybe_heartbeat(self) -> None:
        """Heartbeats follow the interval the coordinator sets (it may differ from our default).
        None once the agent has asked to leave: the coordinator would answer "reregister", and a
        node on its way out would be given work again."""
        if self._leaving_since is not None:
            return
        now = self.clock.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_interval_s:
            self._last_heartbeat = now
            self._heartbeat()

    def _heartbeat(self) -> None:
        if self.clock.monotonic() - self.last_heard > self.node_timeout_s:
            log.warning("no answer from the coordinator for %.1fs; reconnecting",
                        self.clock.monotonic() - self.last_heard)
            self._connect_coordinator()
            return
        if self.registered:
            self._send_heartbeat()
        else:
            self._register()

    def _on_coordinator(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return
        rid = self.sync_memo.same(frames[0])  # the same sync body as last time: not decoded again
        if rid is not None and self.pending.get(rid) == self._on_sync_reply:
            self.last_heard = self.clock.monotonic()
            del self.pending[rid]
            self.sync_memo.hits += 1
            self._on_sync_reply(200, self.sync_memo.body or {})
            return
        try:
            msg = decode_message(frames[0])
        except ApiError as e:
            log.warning("ignoring a malformed message from the coordinator: %s", e.reason)
            return
        self.last_heard = self.clock.monotonic()
        if isinstance(msg, Reply):
            cb = self.pending.pop(msg.id, None)
            if cb is not None:
                if cb == self._on_sync_reply and msg.status == 200:
                    self.sync_memo.remember(frames[0], msg.id, msg.body)
                cb(msg.status, msg.body)
            return
        if msg.op == "sync":  # a push
            self._apply_sync(msg.body)
        elif msg.op == "clear_cache":
            rt = self.runtimes.get(msg.body.get("deployment_id", ""))
            if rt:
                rt.clear_cache()

    def _on_bulk(self, frames: list[bytes]) -> None:
        """Replies on the bulk connection (chunks). They say nothing of our liveness with the
        coordinator: that is the main connection's (heartbeats)."""
        if len(frames) != 1:
            return
        try:
            msg = decode_message(frames[0])
        except ApiError as e:
            log.warning("ignoring a malformed message on the bulk connection: %s", e.reason)
            return
        if isinstance(msg, Reply):
            cb = self.pending.pop(msg.id, None)
            if cb is not None:
                cb(msg.status, msg.body)

    def _on_register_reply(self, status: int, body: dict) -> None:
        if status == 200 and isinstance(body, dict) and "bulk_token" in body:
            body = dict(body)
            token = body.pop("bulk_token")
            self.bulk_token = token if isinstance(token, str) and m.BULK_TOKEN_RE.match(token) else None
        elif status == 200:
            self.bulk_token = None  # a coordinator without bulk connections: chunks on coord
        self._on_sync_reply(status, body)

    def _on_sync_reply(self, status: int, body: dict) -> None:
        if status != 200:
            log.warning("coordinator answered %s: %s", status, body)
            return
        if body.get("reregister"):  # the coordinator restarted (or lost us): what we asked the
            if self._leaving_since is not None:
                return  # an answer to a heartbeat sent before we asked to leave: we stay gone
            self.registered = False  # old one will not be answered; fetches ask again once
            self.pending.clear()     # we are registered with the new one
            self._refetch = True
            self._register()
            return
        if not self.registered:
            log.info("agent [%s] registered with the coordinator", self.node_id)
        self.registered = True
        if self._refetch:
            self._refetch = False
            self.models.on_reconnect()
        self._apply_sync(body)

    def _apply_sync(self, body: dict) -> None:
        # Most heartbeats are answered with what the node already runs: the same body, applied
        # to the same deployments, changes nothing (decoding and applying 100 assignments a
        # second would hold the inference relay up for milliseconds).
        applied = (body, frozenset(self.runtimes))
        if applied == self._sync_applied:
            return
        self._apply_sync_body(body)
        self._sync_applied = (body, frozenset(self.runtimes))

    def _sync_settings(self, body: dict) -> None:
        """The coordinator's timing and client keys, each taken only when it keeps its rule (a
        value that does not is logged and the one in use kept: a NaN interval would stop the
        heartbeats, a string would stop every sync from applying)."""
        hb = body.get("heartbeat_interval_s", self.heartbeat_interval_s)
        nt = body.get("node_timeout_s", self.node_timeout_s)
        if (type(hb) in (int, float) and type(nt) in (int, float) and math.isfinite(hb)
                and math.isfinite(nt) and MIN_HEARTBEAT_S <= hb <= MAX_HEARTBEAT_S
                and hb < nt <= MAX_NODE_TIMEOUT_S):
            self.heartbeat_interval_s, self.node_timeout_s = float(hb), float(nt)
        else:
            log.error("ignoring the coordinator's [heartbeat_interval_s] %r and [node_timeout_s] %r: "
                      "they must be numbers, the interval %gs to %gs and the timeout above it, at most "
                      "%gs; keeping %gs and %gs", str(hb)[:40], str(nt)[:40], MIN_HEARTBEAT_S,
                      MAX_HEARTBEAT_S, MAX_NODE_TIMEOUT_S, self.heartbeat_interval_s, self.node_timeout_s)
        keys = body.get("client_keys")
        if keys is None:
            return
        if isinstance(keys, dict) and all(type(k) is str and r in ("admin", "infer")
                                          for k, r in keys.items()):
            self.client_keys = keys
        else:
            log.error("ignoring the coordinator's [client_keys]: a map of key to role (admin or infer) "
                      "is expected; keeping the %d keys in use", len(self.client_keys))

    def _apply_sync_body(self, body: dict) -> None:
        self._sync_settings(body)
        wanted: dict[str, m.NodeAssignment] = {}
        unreadable: set[str] = set()  # assignments that did not decode: their deployments stay as they are
        for raw in body.get("assignments", []):
            try:
                a = m.decode(m.NodeAssignment, _known_fields(raw), "sync")
            except ApiError as e:
                dep = raw.get("deployment_id") if isinstance(raw, dict) else None
                if type(dep) is str:
                    unreadable.add(dep)
                log.error("ignoring an assignment this agent cannot read (deployment [%s]): %s; what "
                          "runs for it here is left as it is", str(dep)[:100], e.reason)
                continue
            wanted[a.deployment_id] = a
            self.routing_versions[a.deployment_id] = a.routing_version
        for dep_id, a in wanted.items():
            rt = self.runtimes.get(dep_id)
            if rt is None:
                if a.stopping or a.target_allocations <= 0:
                    continue
                self._create(a)
            else:
                rt.update(a)
        for dep_id, rt in list(self.runtimes.items()):
            if dep_id in wanted or dep_id in unreadable:
                continue
            if rt.phase not in (Phase.STOPPING, Phase.STOPPED):
                log.info("deployment [%s] is no longer wanted on node [%s]; draining it",
                         dep_id, self.node_id)
                rt.begin_stop(finish_pending_work=True)
        keep = {sha for a in wanted.values() for sha in (a.sha256, a.tokenizer_sha256) if sha}
        keep |= {sha for rt in self.runtimes.values() if rt.phase != Phase.STOPPED
                 for sha in rt.model_shas()}
        removed = self.models.prune(keep)  # cached models no deployment here uses any more
        if removed:
            log.info("removed %d cached model files no deployment uses: %s", len(removed), ", ".join(removed))

    def _create(self, a: m.NodeAssignment) -> None:
        dep_id = a.deployment_id

        def reply(client: bytes, rid: int, status: int, body: dict) -> None:
            self._reply_client(client, rid, status, body, rv=self.routing_versions.get(dep_id, 0))

        def reply_payload(client: bytes, rid: int, payload: tuple) -> None:
            self._send_client(client, encode_reply(rid, 200, {}, rv=self.routing_versions.get(dep_id, 0)),
                              payload)
        rt = DeploymentRuntime(a, node_id=self.node_id, worker_endpoint=self.worker_endpoint,
                               clock=self.clock, reply=reply, reply_payload=reply_payload,
                               send_worker=self._send_worker, schedule=self.timers.at,
                               restart_budget=self.cfg.worker_restart_budget,
                               restart_window_s=self.cfg.worker_restart_window_s,
                               overrun_grace_s=self.cfg.overrun_grace_s,
                               stop_grace_s=self.cfg.stop_grace_s,
                               queue_max_bytes=self.cfg.queue_max_bytes,
                               load_retries=self.cfg.load_retries,
                               load_timeout_s=self.cfg.load_timeout_s,
                               require_sandbox=self.cfg.require_sandbox)
        rt.on_host_change = lambda rt=rt: self._hosts_changed(rt)
        rt.on_event = self._on_event
        self._active[rt] = None
        self.runtimes[a.deployment_id] = rt
        if self.metrics is not None:
            qh = self.metrics.queue_seconds.labels(dep_id, self.node_id)
            ch = self.metrics.compute_seconds.labels(dep_id, self.node_id)
            rt.observe = lambda q, c: (qh.observe(q), ch.observe(c))
        log.info("deployment [%s] of model [%s] assigned to node [%s]: %d allocations x %d threads",
                 a.deployment_id, a.model_id, self.node_id, a.target_allocations, a.threads_per_allocation)

        paths: dict[str, str] = {}
        blobs = [a.sha256] + ([a.tokenizer_sha256] if a.tokenizer_sha256 else [])

        def fetched(sha: str, path: str | None, error: str | None) -> None:
            if self.runtimes.get(a.deployment_id) is not rt or rt.phase != Phase.FETCHING:
                return
            if error:
                rt.fail(error)
                return
            paths[sha] = path
            if len(paths) == len(blobs):
                rt.model_ready(paths[a.sha256], paths.get(a.tokenizer_sha256 or ""))
        for sha in blobs:
            self.models.ensure(sha, lambda p, e, sha=sha: fetched(sha, p, e))

    def _publish_metrics(self) -> None:
        from mlfleet.common.metrics import counter, gauge
        labels = ["deployment", "node"]
        fams = {k: counter(f"mlfleet_inference_{k}", doc, labels) for k, doc in (
            ("requests", "Inferences (documents) served, cache hits included."),
            ("errors", "Inferences that failed."),
            ("rejected", "Requests rejected: the queue was full (429)."),
            ("timeouts", "Requests answered 408 at their deadline."),
            ("cache_hits", "Inferences served from the cache."))}
        depth = gauge("mlfleet_queue_depth", "Requests queued or running on this node.", labels)
        allocs = gauge("mlfleet_allocations", "Allocations of a deployment on this node.", labels + ["kind"])
        up = gauge("mlfleet_coordinator_connected", "1 while the coordinator answers.", ["node"])
        for dep_id, rt in list(self.runtimes.items()):
            s = rt.report()["stats"]
            lv = [dep_id, self.node_id]
            fams["requests"].add_metric(lv, s["inference_count"])
            fams["errors"].add_metric(lv, s["error_count"])
            fams["rejected"].add_metric(lv, s["rejected_execution_count"])
            fams["timeouts"].add_metric(lv, s["timeout_count"])
            fams["cache_hits"].add_metric(lv, s["inference_cache_hit_count"])
            depth.add_metric(lv, s["number_of_pending_requests"])
            allocs.add_metric(lv + ["current"], rt.ready_count())
            allocs.add_metric(lv + ["target"], rt.target_allocations)
        connected = self.clock.monotonic() - self.last_heard < self.node_timeout_s
        up.add_metric([self.node_id], 1.0 if connected else 0.0)
        self.metrics.publish([*fams.values(), depth, allocs, up])

    def _reap_stopped(self) -> None:
        """Stopped deployments leave: a stopped runtime stays active (ticked) until reaped."""
        for rt in [rt for rt in self._active if rt.phase == Phase.STOPPED]:
            if self.runtimes.get(rt.deployment_id) is not rt:
                self._active.pop(rt, None)  # replaced or gone already
            elif rt.reapable():  # its host's pipe closed too, so its workers are accounted
                del self.runtimes[rt.deployment_id]
                self._active.pop(rt, None)
                log.info("deployment [%s] stopped on node [%s]", rt.deployment_id, self.node_id)
                self._heartbeat_now()

    def _heartbeat_now(self) -> None:
        if self.registered:
            self._send_heartbeat()

    def _tick(self) -> None:
        self.models.tick(self.clock.monotonic())
        for rt in list(self._active):
            if self.runtimes.get(rt.deployment_id) is not rt:
                self._active.pop(rt, None)
                continue
            before = (rt.routing_state(), rt.ready_count())
            rt.tick()
            if (rt.routing_state(), rt.ready_count()) != before:
                self._heartbeat_now()
            if rt.phase != Phase.STOPPED and not rt.needs_tick():
                self._active.pop(rt, None)  # nothing to do until its next event
        self._reap_stopped()  # also those that stopped without a host

    # ---- workers -------------------------------------------------------------------------------
    def _authorize_worker(self, identity: bytes, pid: int) -> str | None:
        """Whether the process ``pid`` (from the kernel) may speak as worker ``identity``: it must
        be a child of that deployment's model host (workers are forked from it). A model runs in
        its worker, so without this one deployment's model could answer another's requests."""
        dep_id = identity.split(b"|", 1)[0].decode(errors="replace")
        rt = self.runtimes.get(dep_id)
        host = rt.host_pid() if rt is not None else None
        if host is None:
            return f"deployment [{dep_id[:100]}] has no model host on this node"
        try:
            parent = psutil.Process(pid).ppid()
        except psutil.Error:
            return "the process is gone"
        if parent != host:
            return f"it is not a child of deployment [{dep_id[:100]}]'s model host"
        return None

    def _send_worker(self, identity: bytes, frames: list[Buffer]) -> None:
        if not self.workers.send(identity, frames):
            log.debug("worker %r unreachable", identity)

    def _on_worker(self, ident: bytes, frames: list[memoryview]) -> None:
        try:
            dep_id, _node, wid = ident.decode().split("|")
        except (UnicodeDecodeError, ValueError):
            return
        rt = self.runtimes.get(dep_id)
        if rt is None:
            self._send_worker(ident, [encode_request("stop", 0, {})])
            return
        try:
            req = decode_request(frames[0])
            if req.op == "results":  # the hot path
                rt.on_worker_message(wid, req, frames[1:])
                return
            before = rt.ready_count()
            rt.on_worker_message(wid, req, frames[1:])
        except ApiError as e:
            log.warning("deployment [%s]: ignoring a malformed message from worker [%s]: %s",
                        dep_id, wid, e.reason)
            return
        if rt.ready_count() != before:
            self._heartbeat_now()

    # ---- clients -------------------------------------------------------------------------------
    def _reply_client(self, ident: bytes, rid: int, status: int, body: dict, **extra: Any) -> None:
        self._send_client(ident, encode_reply(rid, status, body, **extra))

    def _send_client(self, ident: bytes, frame: bytes, payload: tuple = ()) -> None:
        try:
            send_frames(self.infer_sock, [ident, frame, *payload])
        except zmq.ZMQError:
            log.debug("client %r went away before its answer", ident)

    def _on_client(self, ident: bytes, frames: list[zmq.Frame], user: str | None = None) -> None:
        """``frames``: a header and, for ``infer``, the documents' payload frames, which are
        relayed to a worker as they came: never decoded (nor copied) here."""
        if not frames:
            return
        rid = 0
        try:
            # A header is small: decoding it whole within the header's limits costs no more than
            # reading its envelope (peek_request), so the key's role is checked after it. A frame
            # that is not a header of this version is answered with the id peek_request finds.
            header = frames[0].buffer
            try:
                req = decode_request(header, OP_LIMITS["infer"])
            except BadRequest:
                _, rid = peek_request(header)  # raises EnvelopeError (with the id it read) if not even
                raise                          # an envelope; else the error goes back with the id
            op, rid = req.op, req.id
            if not assigned_routing_id(ident):
                raise BadRequest(ROUTING_ID_CHOSEN)
            if self.curve is not None:
                authorize(self.client_keys.get(user or ""), op if op in ("ping", "infer") else "?", user)
            if op == "ping":
                self._reply_client(ident, rid, 200, {"node_id": self.node_id})
                return
            if op != "infer":
                raise BadRequest(f"unknown op [{op[:64]}] on the inference endpoint")
            payload = tuple(frames[1:])
            if not payload:
                raise BadRequest("malformed message: [infer] carries its documents in payload frames "
                                 "after the header, and there are none")
            if len(payload) > m.MAX_PAYLOAD_FRAMES:
                raise BadRequest(f"malformed message: [{len(payload)}] payload frames; at most "
                                 f"[{m.MAX_PAYLOAD_FRAMES}] are taken")
            msg = m.decode_infer(req.body)
            rt = self.runtimes.get(msg.deployment_id)
            if rt is None:
                raise NotFound(f"No known model deployment with id [{msg.deployment_id}] on node "
                               f"[{self.node_id}]", retryable=True)
            cfg = msg.inference_config
            key = None
            if rt.cache_enabled:  # the same documents under another inference_config are another entry
                key = payload_key(payload, pack(cfg) if cfg is not None else b"")
            rt.submit(ident, rid, payload, msg.timeout_ms / 1000.0, key=key, dispatch=False,
                      nbytes=len(header) + payload_size(payload), config=cfg)
            self._submitted.add(rt)
        except EnvelopeError as e:
            self._reply_client(ident, e.request_id, e.status, e.to_body())
        except ApiError as e:
            self._reply_client(ident, rid, e.status, e.to_body())
        except Exception as e:
            log.exception("inference request %s failed", rid)
            self._reply_client(ident, rid, 500, ServerError(f"internal error: {e}").to_body())


def start(cfg: AgentConfig) -> Agent:
    """Start-up: keys, sockets, bind. Errors here are configuration errors (the CLI exits with
    code 2); once ``run`` serves, nothing ends the daemon but a signal."""
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    try:
        agent.bind()
    except BaseException:  # a port in use, a bad address: leave no run dir behind
        shutil.rmtree(agent.run_dir, ignore_errors=True)
        raise
    return agent

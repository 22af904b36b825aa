"""The coordinator daemon: one ROUTER socket for clients and agents, a single-threaded loop,
one handler per op. Handlers either answer at once or park a waiter (``wait_for``, stop) that
is re-checked after every state change and answered at its deadline at the latest."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import zmq

from mlfleet.common import messages as m
from mlfleet.common.clock import Clock
from mlfleet.common.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
)
from mlfleet.common.hf import model_config_problem
from mlfleet.common.offload import Offload
from mlfleet.common.params import (
    id_problem,
    low_priority_rules,
    validate_start,
    validate_update,
    wait_for_reached,
)
from mlfleet.common.proc import sd_notify, watchdog_interval_s, write_ready_file
from mlfleet.common.protocol import (
    DEFAULT_LIMITS,
    OP_LIMITS,
    EnvelopeError,
    decode_request,
    encode_reply,
    encode_reply_raw,
    encode_request,
    pack,
    peek_request,
)
from mlfleet.common.security import Curve, authorize, load_authorized_keys, load_secret, start_authenticator
from mlfleet.common.units import format_time
from mlfleet.common.zmqutil import ROUTING_ID_CHOSEN, Timers, assigned_routing_id, bind, make_socket
from mlfleet.coordinator import planner
from mlfleet.coordinator.adaptive import AdaptiveAllocations
from mlfleet.coordinator.bulk import chunk_reply
from mlfleet.coordinator.config import CoordinatorConfig
from mlfleet.coordinator.heartbeat import HeartbeatMemo, ParsedReports, parse_reports
from mlfleet.coordinator.routing import RoutingIndex
from mlfleet.coordinator.state import (
    AssignmentState,
    Ctx,
    DeploymentRecord,
    ModelRecord,
    NodeRecord,
    RouteReport,
    RoutingState,
    allocation_status,
    assignment_body,
    assignment_state,
    deployment_stats_body,
    routes_of,
)
from mlfleet.coordinator.store import Store, model_config_with_format

log = logging.getLogger(__name__)
TASKS = ("pass_through", "text_embedding", "text_classification", "ner")
UPLOAD_MAX_AGE_S = 24 * 3600.0
DEFER = object()


@dataclass(frozen=True)
class Packed:
    """A reply body already encoded (msgpack): sent as it is."""
    body: bytes


@dataclass
class Waiter:
    ident: bytes
    rid: int
    deadline: float
    check: Callable[[], Optional[tuple[int, dict[str, Any]]]]
    on_timeout: Callable[[], tuple[int, dict[str, Any]]]
    tag: str = ""          # a deployment id: checked when that deployment's routing changes
                           # (every settle when empty), and at its deadline


MAX_WAITING_FOR_ALLOCATION = 100
# Model bytes are bulk work: chunk requests wait in a queue and BULK_IN_FLIGHT chunk at a time is
# read and encoded, off the loop, so heartbeats and registrations never wait behind them (on the
# loop a chunk request costs its checks and an append; a reply, one send without a copy). One at
# a time: with more, 50 nodes fetching at once kept 2 cores busy and heartbeats waited for CPU.
BULK_IN_FLIGHT = 1
SEND_BUFFER = 128 << 10  # bytes: the kernel's send buffer of each connection (see __init__)
MAX_BULK_QUEUED = 8192  # beyond: 503, and the agent asks again after a backoff
# A node's chunk requests that are queued, being read, or sent but still held by ZeroMQ. Beyond:
# 503 naming the limit; the agent asks again after a backoff. An agent asks for 4 chunks of a
# fetch at a time (agent/modelcache.py WINDOW), for every model and tokenizer it fetches at once:
# 64 is 16 fetches at once. A queued request costs a few hundred bytes, not its reply.
MAX_CHUNKS_PER_NODE = 64
# A node's replies being read or read but not yet written to its connection (tracked: a peer that
# does not read keeps them in ZeroMQ). While it has this many, its queue waits (the other nodes'
# are served): a node that never reads pins at most this many replies (4 x 8 MiB), not a pile.
MAX_HELD_PER_NODE = 4
# Messages ZeroMQ queues per connection before a send fails (ROUTER_MANDATORY + NOBLOCK: the
# reply is dropped, never queued further). A peer that reads never comes near it; one that does
# not cannot pile up replies (it is 100,000 in common.zmqutil). A dropped chunk reply is asked
# again by the agent after its chunk timeout; a dropped sync push is repeated in the next
# heartbeat's reply.
SEND_HWM = 1000
# A report of deployments not assigned to the node: at most this many are logged per report
# (the first ids that were not in its previous report), then one line with the count.
MAX_IGNORED_LOGGED = 8
# A node lost this long (no heartbeat, not re-registered) is forgotten: its record, and its
# node_capacity/<id> and node_key/<id> rows in the state file (so the id may then register with
# another agent key). Not while a deployment still names it (targets or warm).
NODE_FORGET_AFTER_S = 24 * 3600.0


@dataclass
class BulkJob:
    ident: bytes
    rid: int
    node_id: str
    sha256: str
    offset: int
    length: int
    bulk_token: Optional[str] = None  # asked on the node's bulk connection (else its registered one)


class Coordinator:
    def __init__(self, config: CoordinatorConfig, clock: Clock | None = None) -> None:
        self.cfg = config
        self.clock = clock or Clock()
        self.store = Store(config.data_dir)
        self.offload = Offload(2, "mlfleet-coordinator-io")
        for model_id, problem in self.store.check_models():
            log.error("model [%s] is unusable: %s; put it again", model_id, problem)
        self.models: dict[str, ModelRecord] = {r.model_id: r for r in self.store.load_models()}
        # A stored row that cannot be loaded (damaged, or naming a model that is not there) is
        # logged by id and left in the file for an operator; the others load and we serve.
        self.deployments: dict[str, DeploymentRecord] = {}
        for d in self.store.load_deployments():
            if d.model_id not in self.models:
                self.store.set_aside(d.deployment_id, f"its model [{d.model_id}] is not stored")
            else:
                self.deployments[d.deployment_id] = d
        self.nodes: dict[str, NodeRecord] = {}
        self._route_sigs: dict[str, tuple] = {}
        self.routing = RoutingIndex()                 # who reports what; what changed
        self._sync_cache: dict[str, dict[str, Any]] = {}  # node -> its sync body, until it changes
        self._sync_packed: dict[str, bytes] = {}      # node -> that body encoded, likewise
        self.hb_memo = HeartbeatMemo()                # what each node last sent that passed the checks
        # model chunks to send, a queue per node, served in turn (round robin across nodes)
        self._bulk: collections.OrderedDict[str, collections.deque[BulkJob]] = collections.OrderedDict()
        self._bulk_queued = 0
        self._bulk_last: Optional[str] = None  # the node whose chunk was read last
        self._bulk_in_flight = 0
        self._bulk_reading: collections.Counter[str] = collections.Counter()  # node -> being read
        self._bulk_held: dict[str, list[zmq.MessageTracker]] = {}  # node -> replies ZeroMQ holds
        self.bulk_refused = 0        # chunk requests refused for MAX_CHUNKS_PER_NODE
        self._bulk_next = 0.0        # the pacer's clock: when the next chunk may start (monotonic)
        self._bulk_timer = False     # a timer to pump the queue again is set
        self._bulk_poll = False      # a timer to look again at nodes waiting for their replies to go
        self._stopping: set[str] = set()              # deployments being stopped
        self._max_version = 0
        self.waiters: list[Waiter] = []
        self._waiters_due = float("inf")  # the earliest deadline among the waiters (or sooner)
        self.timers = Timers(self.clock.monotonic)
        self.ctx = zmq.Context.instance()
        self.sock = make_socket(self.ctx, zmq.ROUTER, hwm=SEND_HWM)
        # One ZeroMQ I/O thread writes to every connection in turn, each write as much as the
        # kernel takes: a small send buffer keeps the slice a 4 MiB chunk reply takes short, so
        # a heartbeat reply to another connection does not wait behind whole chunks.
        self.sock.setsockopt(zmq.SNDBUF, SEND_BUFFER)
        self.curve: Optional[Curve] = None
        self.keys: dict[str, str] = {}
        self.auth = None
        if config.curve_secret_key:
            self.curve = Curve(*load_secret(config.curve_secret_key))
            self.keys = load_authorized_keys(config.authorized_keys) if config.authorized_keys else {}
            self.auth = start_authenticator(self.ctx)
            self.curve.server(self.sock)
        self._keys_mtime = self._keys_stamp()
        self.metrics = None
        if config.metrics_listen:
            from mlfleet.common.metrics import Metrics
            self.metrics = Metrics()
        self.endpoint = ""
        self.started_at = self.clock.monotonic()
        # After a restart, the nodes our stored targets name are expected back within a node
        # timeout: until then the planner counts them with their last known capacity, so the
        # first node to re-register does not take the others' deployments (which would restart
        # healthy workers). Those that do not come back in time are treated as lost.
        self._expected: dict[str, planner.PlanNode] = {}
        for d in self.deployments.values():
            for node_id in d.targets:
                cap = self.store.get_meta(f"node_capacity/{node_id}")
                if cap and node_id not in self._expected:
                    try:
                        processors, memory = (int(x) for x in cap.split(","))
                    except ValueError:
                        log.error("state file: node [%s]'s stored capacity [%s] is not "
                                  "'processors,memory'; not waiting for it after the restart",
                                  node_id[:64], cap[:64])
                        continue
                    self._expected[node_id] = planner.PlanNode(node_id, processors, memory)
        self._running = False
        self._behind_since: Optional[float] = None  # since when frames have been waiting for us
        self._settling = False
        self._resettle = False
        self.loop_errors = 0  # faults caught in the loop (logged with their tracebacks)
        self.handlers: dict[str, tuple[type, Callable[..., Any]]] = {
            "put_model_chunk": (m.PutModelChunk, self.on_put_model_chunk),
            "put_model": (m.PutModel, self.on_put_model),
            "get_models": (m.GetModels, self.on_get_models),
            "delete_model": (m.DeleteModel, self.on_delete_model),
            "start_deployment": (m.StartDeployment, self.on_start),
            "update_deployment": (m.UpdateDeployment, self.on_update),
            "stop_deployment": (m.StopDeployment, self.on_stop),
            "clear_cache": (m.DeploymentRef, self.on_clear_cache),
            "get_stats": (m.GetStats, self.on_get_stats),
            "get_nodes": (m.Empty, self.on_get_nodes),
            "get_routing": (m.DeploymentRef, self.on_get_routing),
            "await_routes": (m.AwaitRoutes, self.on_await_routes),
            "ping": (m.Empty, lambda ctx, msg: {"ok": True}),
            # agent protocol
            "register": (m.Register, self.on_register),
            "heartbeat": (m.Heartbeat, self.on_heartbeat),
            "model_chunk": (m.ModelChunk, self.on_model_chunk),
            "leave": (m.Leave, self.on_leave),
            "rotate_node_key": (m.RotateNodeKey, self.on_rotate_node_key),
        }
        self.agent_ops = {"register", "heartbeat", "model_chunk", "leave"}
        # The connection each node registered from (its ZeroMQ routing id, chosen by our ROUTER,
        # never by the agent): pushes go there; agent messages from any other connection are not
        # that node's.
        self._node_of: dict[bytes, str] = {}
        for d in self.deployments.values():
            self._route_sigs[d.deployment_id] = ()
            self.routing.dirty.add(d.deployment_id)
            self._max_version = max(self._max_version, d.routing_version)
            if d.stopping:
                self._stopping.add(d.deployment_id)
        self.adaptive = AdaptiveAllocations(
            clock=self.clock, scale_to_zero_after_s=config.scale_to_zero_after_s,
            scale_up_cooldown_s=config.scale_up_cooldown_s, deployments=self.deployments,
            alive=self._alive, routes=self._routes, set_allocations=self._set_allocations,
            push_sync=self._push_sync, save=self._save_deployment)

    # ---- lifecycle ---------------------------------------------------------------------------
    def bind(self) -> str:
        self.endpoint = bind(self.sock, self.cfg.listen)
        if self.metrics is not None:
            log.info("coordinator metrics on %s", self.metrics.serve(
                self.cfg.metrics_listen, tls_cert=self.cfg.metrics_tls_cert,
                tls_key=self.cfg.metrics_tls_key, basic_auth=self.cfg.metrics_basic_auth))
        log.info("coordinator listening on %s (data dir %s, %d models, %d deployments)",
                 self.endpoint, self.cfg.data_dir, len(self.models), len(self.deployments))
        return self.endpoint

    def run(self) -> None:
        if not self.endpoint:
            self.bind()
        self.timers.every(self.cfg.heartbeat_interval_s, self._check_nodes)
        self.timers.every(0.05, self._settle)
        self.timers.every(self.cfg.adaptive_interval_s, self.adaptive.tick)
        self.timers.every(1.0, self.adaptive.expire_warm)
        self._running = True
        if self.metrics is not None:
            self.timers.every(1.0, self._publish_metrics)
        if self.cfg.ready_file:
            write_ready_file(self.cfg.ready_file, self.endpoint,
                             **({"metrics": self.metrics.url} if self.metrics else {}))
        sd_notify("READY=1")
        if (wd := watchdog_interval_s()) is not None:  # fed from the loop: a stuck loop stops feeding
            self.timers.every(wd, lambda: sd_notify("WATCHDOG=1"))
        self.timers.every(600.0, self._cleanup_uploads)
        self.timers.every(2.0, self._reload_keys)
        if self._expected:
            self.timers.at(self.clock.monotonic() + self.cfg.node_timeout_s, self._end_startup_grace)
        self._cleanup_uploads()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.offload.fd, zmq.POLLIN)
        try:
            while self._running:
                self._guarded("poll", lambda: self._loop_once(poller))
        finally:
            self.close()

    def _loop_once(self, poller: zmq.Poller) -> None:
        events = dict(poller.poll(self.timers.timeout_ms(200)))
        if self.sock not in events:
            self._behind_since = None
        else:
            for _ in range(256):
                try:
                    raw = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self._behind_since = None  # caught up: nothing is waiting
                    break
                user = None
                if self.curve is not None and len(raw) > 1:
                    try:
                        user = raw[1].get("User-Id")
                    except zmq.ZMQError:
                        user = None
                # the routing id as bytes; the message itself stays in ZeroMQ's buffer (no copy)
                frames = [raw[0].bytes, *(f.buffer for f in raw[1:])]
                self._guarded("frame", lambda frames=frames, user=user: self._on_frames(frames, user))
            else:  # 256 frames and maybe more waiting: we are behind
                if self._behind_since is None:
                    self._behind_since = self.clock.monotonic()
        if self.offload.fd in events:
            self.offload.run_done()
        self.timers.run_due()
        self._settle()

    def _end_startup_grace(self) -> None:
        missing = sorted(n for n in self._expected if n not in self.nodes)
        self._expected = {}
        if missing:
            log.warning("nodes %s did not come back within the node timeout after the coordinator "
                        "started; planning their allocations elsewhere", missing)
            self._rebalance("nodes did not come back: " + ",".join(missing))

    def _keys_stamp(self) -> Optional[tuple[int, int]]:
        try:
            st = os.stat(self.cfg.authorized_keys) if self.cfg.authorized_keys else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def _reload_keys(self) -> None:
        """The authorized keys file is read again when it changes: keys are added, rotated and
        revoked without a restart. A file that cannot be read keeps the keys we have."""
        if self.curve is None or not self.cfg.authorized_keys:
            return
        stamp = self._keys_stamp()
        if stamp == self._keys_mtime:
            return
        try:
            keys = load_authorized_keys(self.cfg.authorized_keys)
        except (OSError, ValueError) as e:
            log.error("keeping the authorized keys we have: %s", e)
            return
        self._keys_mtime = stamp
        if keys != self.keys:
            log.info("authorized keys reloaded: %d keys (%d before)", len(keys), len(self.keys))
            self.keys = keys
            self._push_all()  # agents learn which client keys may send them inference

    def _cleanup_uploads(self) -> None:
        """Uploads abandoned for a day are removed (off the loop)."""
        def done(removed: Any, error: Optional[BaseException]) -> None:
            if error is not None:
                log.warning("could not clean up abandoned uploads: %s", error)
            elif removed:
                log.info("removed %d abandoned uploads: %s", len(removed), ", ".join(removed))
        self.offload.submit(self.store.cleanup_uploads, UPLOAD_MAX_AGE_S, done=done)

    def _guarded(self, what: str, fn: Callable[[], Any]) -> None:
        """No exception escapes the loop: a fault is logged with its traceback and counted, and
        the daemon goes on (the request that hit it, if any, was already answered 500)."""
        try:
            fn()
        except Exception:
            self.loop_errors += 1
            log.exception("coordinator: %s failed; carrying on", what)

    def stop(self, *_: Any) -> None:
        self._running = False

    def close(self) -> None:
        self.offload.wait_idle(10.0)  # uploads being placed finish (their replies are dropped)
        self.offload.close()
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()
        log.info("coordinator stopped")

    def _publish_metrics(self) -> None:
        from mlfleet.common.metrics import gauge
        node_up = gauge("mlfleet_node_up", "1 while a node's heartbeats arrive, 0 once it is lost.", ["node"])
        for n in self.nodes.values():
            node_up.add_metric([n.node_id], 1.0 if n.alive else 0.0)
        allocs = gauge("mlfleet_deployment_allocations", "A deployment's allocations.",
                       ["deployment", "kind"])
        inf = gauge("mlfleet_deployment_inference_count", "Inferences reported by the nodes.", ["deployment"])
        for d in self.deployments.values():
            routes = self._routes(d)
            allocs.add_metric([d.deployment_id, "current"],
                              sum(r.current_allocations for r in routes if r.routable))
            allocs.add_metric([d.deployment_id, "target"], d.number_of_allocations)
            inf.add_metric([d.deployment_id], sum(
                int(n.reports[d.deployment_id].stats.get("inference_count", 0))
                for n in self._alive() if d.deployment_id in n.reports))
        waiting = gauge("mlfleet_waiting_requests", "Requests parked on wait_for, stop or an allocation.", [])
        waiting.add_metric([], len(self.waiters))
        self.metrics.publish([node_up, allocs, inf, waiting])

    # ---- transport -----------------------------------------------------------------------------
    def _send(self, ident: bytes, frame: bytes | bytearray) -> bool:
        try:
            # large frames (model chunks) are handed to ZeroMQ without a copy
            self.sock.send_multipart([ident, frame], zmq.NOBLOCK, copy=len(frame) < 1 << 16)
            return True
        except zmq.ZMQError as e:
            log.debug("could not send to %r: %s", ident, e)
            return False

    def _reply(self, ident: bytes, rid: int, status: int, body: dict[str, Any]) -> None:
        self._send(ident, encode_reply(rid, status, body))

    def _on_frames(self, frames: list[bytes], user: Optional[str] = None) -> None:
        if len(frames) < 2:
            return  # nothing to answer: the ROUTER always prefixes an identity
        ident = frames[0]
        if len(frames) != 2:
            self._reply(ident, 0, 400, BadRequest(
                f"malformed message: expected 1 frame, got {len(frames) - 1}").to_body())
            return
        rid = 0
        try:
            # Trust before decoding: the op and id are read from the envelope (the body is
            # skipped, never built); the key's role is checked; only then is the body decoded,
            # within the limits of its op.
            op, rid = peek_request(frames[1])
            if not assigned_routing_id(ident):
                raise BadRequest(ROUTING_ID_CHOSEN)
            if self.curve is not None:
                authorize(self.keys.get(user or ""), op, user)
            entry = self.handlers.get(op)
            if entry is None:
                raise BadRequest(f"unknown op [{op[:64]}]")
            limits = OP_LIMITS.get(op, DEFAULT_LIMITS)
            if op == "heartbeat":  # a heartbeat like the last one is not decoded and checked again
                hb, reports = self.hb_memo.decode(
                    ident, frames[1], lambda f: decode_request(f, limits).body, ident in self._node_of)
                result: Any = self.on_heartbeat(Ctx(ident, rid, user), hb, reports)
            else:
                req = decode_request(frames[1], limits)
                cls, handler = entry
                msg = m.decode(cls, req.body, req.op)
                result = handler(Ctx(ident, rid, user), msg)
            if isinstance(result, Packed):
                self._send(ident, encode_reply_raw(rid, 200, result.body))
            elif result is not DEFER:
                self._reply(ident, rid, 200, result)
        except EnvelopeError as e:
            self._reply(ident, e.request_id, e.status, e.to_body())
        except ApiError as e:
            self._reply(ident, rid, e.status, e.to_body())
        except Exception as e:  # a handler bug must not take the daemon down
            log.exception("handler failed for request %s", rid)
            self._reply(ident, rid, 500, ServerError(f"internal error: {type(e).__name__}: {e}").to_body())
        self._settle()

    # ---- helpers -------------------------------------------------------------------------------
    def _model(self, model_id: str) -> ModelRecord:
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(f"Could not find trained model [{model_id}]")
        return model

    def _deployment(self, deployment_id: str) -> DeploymentRecord:
        dep = self.deployments.get(deployment_id)
        if dep is None:
            raise NotFound(f"No known model deployment with id [{deployment_id}]")
        return dep

    def _routes(self, dep: DeploymentRecord):
        return routes_of(dep, self.nodes, self.routing.reporting(dep.deployment_id))

    def _alive(self) -> list[NodeRecord]:
        return [n for n in self.nodes.values() if n.alive]

    def _plan_deployment(self, d: DeploymentRecord, allocations: int | None = None,
                         current: dict[str, int] | None = None) -> planner.PlanDeployment:
        model = self.models[d.model_id]
        return planner.PlanDeployment(
            deployment_id=d.deployment_id,
            allocations=d.number_of_allocations if allocations is None else allocations,
            threads=d.threads_per_allocation,
            memory_bytes=planner.memory_estimate(model.size, d.cache_bytes(model)),
            priority=d.priority, current=dict(d.targets) if current is None else current)

    def _plan(self, override: dict[str, planner.PlanDeployment] | None = None) -> planner.Plan:
        override = override or {}
        nodes = [planner.PlanNode(n.node_id, n.allocated_processors,
                                  int(n.memory.get("total_bytes", 0))) for n in self._alive()]
        nodes += [n for node_id, n in self._expected.items() if node_id not in self.nodes]
        deps = [override.get(d.deployment_id) or self._plan_deployment(d)
                for d in self.deployments.values() if not d.stopping]
        deps += [p for k, p in override.items() if k not in self.deployments]
        return planner.plan(nodes, deps)

    def _apply(self, p: planner.Plan, why: str) -> None:
        """Adopt a plan's targets and reasons, persist them and tell the agents concerned."""
        touched: set[str] = set()
        for dep_id, targets in p.assignments.items():
            dep = self.deployments.get(dep_id)
            if dep is None:
                continue
            reason = p.reasons.get(dep_id, "")
            if targets != dep.targets or reason != dep.reason:
                touched |= set(targets) | set(dep.targets)
                if targets != dep.targets:
                    log.info("Rebalanced allocations because [%s]: deployment [%s] %s -> %s",
                             why, dep_id, dep.targets, targets)
                self._commit(dep, targets=dict(targets), reason=reason)
                self.routing.dirty.add(dep_id)
        for node_id in touched:
            self._push_sync(node_id)

    def _commit(self, dep: DeploymentRecord, **changes: Any) -> None:
        """Change a deployment: written to the state file first, then in memory. A failed write
        (a full disk: ServerError) changes neither."""
        self.store.save_deployment(dataclasses.replace(dep, **changes))
        for k, v in changes.items():
            setattr(dep, k, v)

    def _save_deployment(self, dep: DeploymentRecord) -> None:
        self.store.save_deployment(dep)
        self.routing.dirty.add(dep.deployment_id)

    def _rebalance(self, why: str) -> None:
        self._apply(self._plan(), why)

    def _next_version(self) -> int:
        self._max_version = max(self.clock.wall_ms(), self._max_version + 1)
        return self._max_version

    def _settle(self) -> None:
        """After a frame, a timer or a change of state: bump the routing versions whose routable
        set changed, then answer the waiters whose condition holds (or whose deadline passed).

        A waiter's check may itself change state (a failed start begins a stop): a call made
        while settling only asks for another round, so nothing recurses; rounds are bounded."""
        if self._settling:
            self._resettle = True
            return
        self._settling = True
        try:
            for _ in range(8):
                self._resettle = False
                dirty = self.routing.take_dirty()
                self._update_route_versions(dirty)
                self._check_waiters(dirty)
                if not self._resettle and not self.routing.dirty:
                    break
        finally:
            self._settling = False

    def _update_route_versions(self, dirty: set[str]) -> None:
        """Bump the routing version of each deployment (among those whose routing may have
        changed) whose routable set did change; the nodes concerned get a fresh sync body."""
        for dep_id in dirty:
            dep = self.deployments.get(dep_id)
            if dep is None:
                continue
            for node_id in set(dep.targets) | set(dep.warm) | self.routing.reporting(dep_id):
                self._sync_cache.pop(node_id, None)
            routes = self._routes(dep)
            sig = tuple((r.node_id, r.current_allocations) for r in routes if r.routable)
            if dep.stopping:
                sig = ("stopping",)
            if self._route_sigs.get(dep.deployment_id) != sig:
                self._route_sigs[dep.deployment_id] = sig
                dep.routing_version = self._next_version()
                current = sum(r.current_allocations for r in routes if r.routable)
                dep.max_assigned_allocations = max(dep.max_assigned_allocations, current)

    def _check_waiters(self, dirty: set[str]) -> None:
        """Waiters are looked at when what they wait on changed, or at their deadline."""
        if not self.waiters:
            return
        now = self.clock.monotonic()
        if not dirty and now < self._waiters_due:
            return  # nothing they wait on changed and no deadline passed: O(1), not O(waiters)
        waiting, self.waiters = self.waiters, []
        keep = []
        for w in waiting:
            if w.tag and w.tag not in dirty and now < w.deadline:
                keep.append(w)
                continue
            try:
                result = w.check()
                if result is None and now >= w.deadline:
                    result = w.on_timeout()
            except ApiError as e:
                result = (e.status, e.to_body())
            except Exception as e:  # a bug in a check answers its own request, nothing else
                self.loop_errors += 1
                log.exception("waiter for request %s failed", w.rid)
                result = (500, ServerError(f"internal error: {type(e).__name__}: {e}").to_body())
            if result is None:
                keep.append(w)
            else:
                self._reply(w.ident, w.rid, *result)
        self.waiters = keep + self.waiters  # waiters parked by a check stay too
        self._waiters_due = min((w.deadline if w.tag else now for w in self.waiters), default=float("inf"))

    def _offload(self, ctx: Ctx, fn: Callable[..., Any], *args: Any,
                 then: Callable[[Any], dict[str, Any]]) -> object:
        """Run blocking work (hashing, file I/O) on the Offload pool; answer the request when it
        is done, from the loop: ``then(result)`` builds the body (and may raise an ApiError)."""
        ident, rid = ctx.ident, ctx.rid

        def done(result: Any, error: Optional[BaseException]) -> None:
            try:
                if error is not None:
                    raise error
                self._reply(ident, rid, 200, then(result))
            except ApiError as e:
                self._reply(ident, rid, e.status, e.to_body())
            except Exception as e:
                self.loop_errors += 1
                log.error("request %s failed", rid, exc_info=e)
                self._reply(ident, rid, 500,
                            ServerError(f"internal error: {type(e).__name__}: {e}").to_body())
        self.offload.submit(fn, *args, done=done)
        return DEFER

    def _park(self, ctx: Ctx, timeout_s: float, check, on_timeout, tag: str = "") -> object:
        """Answer the request later: when ``check`` returns a reply, or ``on_timeout``'s at the
        deadline."""
        w = Waiter(ctx.ident, ctx.rid, self.clock.monotonic() + timeout_s, check, on_timeout, tag)
        self.waiters.append(w)
        # an untagged waiter is checked at every settle (its due time is now)
        self._waiters_due = min(self._waiters_due, w.deadline if tag else self.clock.monotonic())
        return DEFER

    # ---- agent sync ----------------------------------------------------------------------------
    def _node_assignments(self, node_id: str) -> list[dict[str, Any]]:
        out = []
        for dep in self.deployments.values():
            target = dep.targets.get(node_id, 0)
            if target <= 0 and node_id not in dep.warm and not (
                    dep.stopping and node_id in self._reporting_nodes(dep)):
                continue
            model = self.models[dep.model_id]
            out.append(m.encode(m.NodeAssignment(
                deployment_id=dep.deployment_id, model_id=dep.model_id, sha256=model.sha256,
                model_bytes=model.size, task=model.task,
                threads_per_allocation=dep.threads_per_allocation, target_allocations=target,
                queue_capacity=dep.queue_capacity, cache_size_bytes=dep.cache_bytes(model),
                priority=dep.priority, stopping=dep.stopping,
                finish_pending_work=dep.finish_pending_work, routing_version=dep.routing_version,
                tokenizer_sha256=model.tokenizer_sha256, model_config=model.model_config,
                max_batch_size=dep.max_batch_size, max_batch_delay_ms=dep.max_batch_delay_ms)))
        return out

    def _reporting_nodes(self, dep: DeploymentRecord) -> set[str]:
        return {n for n in self.routing.reporting(dep.deployment_id) if self.nodes[n].alive}

    def _sync_body(self, node_id: str) -> dict[str, Any]:
        """What a node must run. Kept until something for that node changes (a push, or a
        routing change of one of its deployments): a heartbeat that changes nothing costs no
        walk over the deployments."""
        body = self._sync_cache.get(node_id)
        if body is None:
            body = self._sync_cache[node_id] = self._build_sync_body(node_id)
            self._sync_packed.pop(node_id, None)
        return body

    def _sync_body_packed(self, node_id: str) -> bytes:
        """The sync body encoded, kept as long as the body itself."""
        body = self._sync_body(node_id)
        packed = self._sync_packed.get(node_id)
        if packed is None:
            packed = self._sync_packed[node_id] = pack(body)
        return packed

    def _build_sync_body(self, node_id: str) -> dict[str, Any]:
        body = {"assignments": self._node_assignments(node_id),
                "heartbeat_interval_s": self.cfg.heartbeat_interval_s,
                "node_timeout_s": self.cfg.node_timeout_s}
        if self.curve is not None:  # who may send inference to the agent
            body["client_keys"] = {k: r for k, r in self.keys.items() if r in ("admin", "infer")}
        return body

    def _push_sync(self, node_id: str) -> None:
        self._sync_cache.pop(node_id, None)
        node = self.nodes.get(node_id)
        if node and node.alive:
            self._send(node.ident, encode_request("sync", 0, self._sync_body(node_id)))

    def _push_all(self) -> None:
        for node in self._alive():
            self._push_sync(node.node_id)

    # ---- agent protocol ------------------------------------------------------------------------
    def _ingest_reports(self, node: NodeRecord, reports: ParsedReports) -> None:
        """An agent's reports (checked by ``parse_reports``) count only for deployments planned
        on that node (or that it was already running, while it drains them), and never for more
        allocations than it was given: an agent key cannot attract traffic to deployments it
        was not assigned."""
        parsed: dict[str, RouteReport] = {}
        ignored: set[str] = set()  # this report's only: what it no longer reports is forgotten
        new = 0
        for r, state in reports:
            dep = self.deployments.get(r.deployment_id)
            if dep is None or not (node.node_id in dep.targets or node.node_id in dep.warm
                                   or r.deployment_id in node.reports):
                ignored.add(r.deployment_id)
                if r.deployment_id not in node.ignored:
                    new += 1
                    if new <= MAX_IGNORED_LOGGED:
                        log.warning("node [%s] reports deployment [%s], which is not assigned to it; "
                                    "ignoring the report", node.node_id, r.deployment_id[:64])
                continue
            target = dep.targets.get(node.node_id, 0)
            cap = target if target > 0 else dep.number_of_allocations  # draining: what it may hold
            parsed[r.deployment_id] = RouteReport(state, min(r.current_allocations, cap),
                                                  r.target_allocations, r.reason, r.stats)
        if new > MAX_IGNORED_LOGGED:
            log.warning("node [%s] reports %d more deployments not assigned to it (not logged one by "
                        "one); ignoring them", node.node_id, new - MAX_IGNORED_LOGGED)
        node.ignored = ignored
        old, node.reports = node.reports, parsed
        if self.nodes.get(node.node_id) is node:  # (a registering node's record is not in yet)
            self.routing.reports_changed(node.node_id, old, parsed)

    def _node_for(self, ident: bytes, node_id: str) -> Optional[NodeRecord]:
        """The live node this connection registered as, if it is ``node_id``."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive or self._node_of.get(ident) != node_id or node.ident != ident:
            return None
        return node

    def on_register(self, ctx: Ctx, msg: m.Register) -> dict[str, Any]:
        user = ctx.user if self.curve is not None else None
        if self.curve is not None:
            # a node id belongs to the agent key that first registered it successfully, until an
            # admin moves it to another key (rotate_node_key)
            owner = self.store.get_meta(f"node_key/{msg.node_id}")
            if owner is not None and owner != user:
                raise Forbidden(f"node [{msg.node_id}] is registered to another agent key")
        prev = self._node_of.get(ctx.ident)
        if prev is not None and prev != msg.node_id and self._node_for(ctx.ident, prev) is not None:
            raise Conflict(f"[node_id] [{msg.node_id}]: this connection is registered as node [{prev}]; "
                           "one connection registers one node (leave first, or connect again)")
        known = self.nodes.get(msg.node_id)
        node = NodeRecord(msg.node_id, msg.hostname, msg.transport_address, msg.allocated_processors,
                          msg.cpu, msg.memory, msg.pid, self.clock.monotonic(),
                          public_key=user, ident=ctx.ident, bulk_token=secrets.token_hex(16))
        if known is not None and known.alive:
            node.reports = known.reports  # continuity: what it ran before counts while it drains
        self._ingest_reports(node, parse_reports(msg.deployments))
        if known is not None:
            self._node_of.pop(known.ident, None)
            self.hb_memo.forget(known.ident)
        self.hb_memo.forget(ctx.ident)
        self.nodes[msg.node_id] = node
        self.routing.reports_changed(msg.node_id, known.reports if known else {}, node.reports)
        self.routing.dirty |= {d.deployment_id for d in self.deployments.values()
                               if msg.node_id in d.targets}  # its STARTING routes appear
        self._node_of[ctx.ident] = msg.node_id
        self._expected.pop(msg.node_id, None)
        capacity = f"{msg.allocated_processors},{int(msg.memory.get('total_bytes', 0))}"
        if self.store.get_meta(f"node_capacity/{msg.node_id}") != capacity:
            self.store.set_meta(f"node_capacity/{msg.node_id}", capacity)
        if self.curve is not None and self.store.get_meta(f"node_key/{msg.node_id}") is None:
            self.store.set_meta(f"node_key/{msg.node_id}", user or "")
        log.info("node [%s] %s at %s with %d allocated processors (%d deployments running)",
                 msg.node_id, "re-registered" if known else "registered", msg.transport_address,
                 msg.allocated_processors, len(node.reports))
        # Adopt what the node already runs when we planned it there (e.g. after our restart), and
        # place what could not be placed. A plan costs O(nodes + deployments): it is skipped when
        # it cannot change anything (the planner keeps current placements).
        if self._join_may_change_plan(msg.node_id, node):
            self._rebalance(f"node [{msg.node_id}] joined")
        self._push_sync(msg.node_id)
        # the bulk connection's credential goes to this connection only (never in a push)
        return {**self._sync_body(msg.node_id), "bulk_token": node.bulk_token}

    def _join_may_change_plan(self, node_id: str, node: NodeRecord) -> bool:
        """Whether planning again after ``node`` (re-)registered can change any target: it
        reports deployments, or is planned for some already (its capacity may differ now), or
        some deployment is not fully placed, or nodes are still expected back after our restart."""
        if node.reports or self._expected:
            return True
        for d in self.deployments.values():
            if node_id in d.targets or node_id in d.warm:
                return True
            if not d.stopping and sum(d.targets.values()) < d.number_of_allocations:
                return True
        return False

    def on_heartbeat(self, ctx: Ctx, msg: m.Heartbeat,
                     reports: Optional[ParsedReports] = None) -> Any:
        node = self._node_for(ctx.ident, msg.node_id)
        if node is None:
            return {"reregister": True}
        if self.curve is not None and node.public_key != ctx.user:
            raise Forbidden(f"node [{msg.node_id}] is registered to another agent key")
        node.last_seen = self.clock.monotonic()
        node.memory = msg.memory
        self._ingest_reports(node, parse_reports(msg.deployments) if reports is None else reports)
        if self._stopping:
            self._finish_stops()
        return Packed(self._sync_body_packed(msg.node_id))

    def on_leave(self, ctx: Ctx, msg: m.Leave) -> dict[str, Any]:
        """An agent shutting down cleanly: its routes go at once (clients move first) and its
        allocations are planned elsewhere, as for a lost node."""
        node = self._node_for(ctx.ident, msg.node_id)
        if node is None:
            return {"left": False}
        log.info("node [%s] is leaving the cluster", node.node_id)
        self._lose([node], "left")
        return {"left": True}

    def on_model_chunk(self, ctx: Ctx, msg: m.ModelChunk) -> dict[str, Any]:
        """Model bytes go only to a registered node that runs (or is to run) that model: asked
        on the connection it registered from, or on its bulk connection (any other connection
        of the same agent key, naming the node and the token its registration was given), so
        that its heartbeat replies never wait behind chunk replies on one connection."""
        node = self._bulk_node(ctx, msg) if msg.node_id is not None or msg.bulk_token is not None \
            else self._node_for(ctx.ident, self._node_of.get(ctx.ident, ""))
        if node is None:  # e.g. an agent reconnecting: it asks again once it has registered
            raise ServiceUnavailable("[model_chunk] is for registered nodes: register first")
        wanted = {sha for a in self._sync_body(node.node_id)["assignments"]
                  for sha in (a["sha256"], a["tokenizer_sha256"]) if sha}
        if msg.sha256 not in wanted:
            raise Forbidden(f"model definition [{msg.sha256}] is not assigned to node [{node.node_id}]")
        if self.store.blob_path(msg.sha256) is None:
            raise NotFound(f"Could not find model definition [{msg.sha256}]")
        if msg.offset < 0 or not 0 < msg.length <= 8 << 20:
            raise BadRequest("[offset] must be >= 0 and [length] between 1 and 8mb")
        if self.bulk_pending(node.node_id) >= MAX_CHUNKS_PER_NODE:
            self.bulk_refused += 1
            raise ServiceUnavailable(
                f"node [{node.node_id}] has {MAX_CHUNKS_PER_NODE} chunk requests queued or unread "
                f"(MAX_CHUNKS_PER_NODE); ask again once their replies are read")
        if self._bulk_queued >= MAX_BULK_QUEUED:
            raise ServiceUnavailable("the coordinator has too many model chunks to send; ask again later")
        self._bulk.setdefault(node.node_id, collections.deque()).append(BulkJob(
            ctx.ident, ctx.rid, node.node_id, msg.sha256, msg.offset, msg.length, msg.bulk_token))
        self._bulk_queued += 1
        self._pump_bulk()
        return DEFER

    def bulk_pending(self, node_id: str) -> int:
        """A node's chunk requests queued, being read, or sent but still held by ZeroMQ."""
        return len(self._bulk.get(node_id, ())) + self._bulk_unsent(node_id)

    def _bulk_unsent(self, node_id: str) -> int:
        """A node's chunk replies being read, or sent but not yet written out by ZeroMQ."""
        held = self._bulk_held.get(node_id, ())
        return self._bulk_reading[node_id] + sum(not t.done for t in held)

    def _prune_held(self) -> None:
        for node_id, held in list(self._bulk_held.items()):
            held[:] = [t for t in held if not t.done]
            if not held:
                del self._bulk_held[node_id]

    def bulk_queued(self, node_id: str) -> int:
        """A node's chunk requests waiting for their turn."""
        return len(self._bulk.get(node_id, ()))

    def bulk_next_node(self) -> Optional[str]:
        """The node whose chunk is read next: the queues are served in turn (the node served last
        waits while another has one queued), passing over nodes with MAX_HELD_PER_NODE replies
        not yet written out. None: nothing can be read now."""
        ready = [n for n in self._bulk if self._bulk_unsent(n) < MAX_HELD_PER_NODE]
        if len(ready) > 1 and ready[0] == self._bulk_last:
            return ready[1]
        return ready[0] if ready else None

    def _next_bulk_job(self) -> Optional[BulkJob]:
        node_id = self.bulk_next_node()
        if node_id is None:
            return None
        jobs = self._bulk[node_id]
        job = jobs.popleft()
        self._bulk_queued -= 1
        self._bulk_last = node_id
        if jobs:
            self._bulk.move_to_end(node_id)  # behind the nodes that wait
        else:
            del self._bulk[node_id]
        return job

    def _bulk_node(self, ctx: Ctx, msg: m.ModelChunk) -> NodeRecord:
        """The node a request on a bulk connection is for: registered and alive, the token of its
        current registration, and (with CURVE) the key it registered with."""
        if msg.node_id is None or msg.bulk_token is None:
            raise BadRequest("[node_id] and [bulk_token] come together (a request on an agent's bulk "
                             "connection) or not at all (on the connection it registered from)")
        node = self.nodes.get(msg.node_id)
        if node is None or not node.alive:
            raise ServiceUnavailable(f"[model_chunk] on a bulk connection: node [{msg.node_id}] is not "
                                     "registered: register first")
        if self.curve is not None and node.public_key != ctx.user:
            raise Forbidden(f"node [{msg.node_id}] is registered to another agent key")
        if not secrets.compare_digest(node.bulk_token, msg.bulk_token):
            raise Forbidden(f"[bulk_token] is not the one the registration of node [{msg.node_id}] was "
                            "given: a bulk connection is taken only from the agent that registered")
        return node

    def _job_valid(self, job: BulkJob) -> bool:
        """A queued chunk is still owed: its node has not been lost, left or registered again."""
        if job.bulk_token is None:
            return self._node_for(job.ident, job.node_id) is not None
        node = self.nodes.get(job.node_id)
        return node is not None and node.alive and node.bulk_token == job.bulk_token

    def _pump_bulk(self) -> None:
        """Start the next queued chunks, BULK_IN_FLIGHT at a time: each is read and its whole
        reply encoded on an Offload thread; the loop only sends the frame. A chunk whose node is
        gone (lost, left or registered again) is dropped; one whose connection has gone is read
        and then dropped by ZeroMQ (ROUTER_MANDATORY: the send fails, logged at debug level)."""
        rate = self.cfg.bulk_max_bytes_per_sec
        while self._bulk and self._bulk_in_flight < BULK_IN_FLIGHT:
            now = self.clock.monotonic()
            if rate and now < self._bulk_next:  # paced: start the next chunk when its turn comes
                if not self._bulk_timer:
                    self._bulk_timer = True
                    self.timers.at(self._bulk_next, self._bulk_turn)
                return
            self._prune_held()
            job = self._next_bulk_job()
            if job is None:  # every queued node waits for its replies to be written out
                if not self._bulk_poll:
                    self._bulk_poll = True
                    self.timers.at(now + 0.02, self._bulk_look_again)
                return
            if not self._job_valid(job):
                continue
            if rate:
                self._bulk_next = max(now, self._bulk_next) + job.length / rate
            self._bulk_in_flight += 1
            self._bulk_reading[job.node_id] += 1
            self.offload.submit(self._chunk_reply, job, done=lambda frame, error, job=job:
                                self._bulk_done(job, frame, error))

    def _bulk_look_again(self) -> None:
        self._bulk_poll = False
        self._pump_bulk()

    def _bulk_turn(self) -> None:
        self._bulk_timer = False
        self._pump_bulk()

    def _chunk_reply(self, job: BulkJob) -> bytes | bytearray:  # on an Offload thread
        paths = (self.store.model_path(job.sha256), self.store.tokenizer_path(job.sha256))
        try:
            return chunk_reply(job.sha256, paths, job.rid, job.offset, job.length)
        except ApiError as e:
            return encode_reply(job.rid, e.status, e.to_body())

    def _bulk_done(self, job: BulkJob, frame: Optional[bytes | bytearray],
                   error: Optional[BaseException]) -> None:
        self._bulk_in_flight -= 1
        self._bulk_reading[job.node_id] -= 1
        if self._bulk_reading[job.node_id] <= 0:
            del self._bulk_reading[job.node_id]
        if error is not None:
            self.loop_errors += 1
            log.error("model chunk for request %s failed", job.rid, exc_info=error)
            frame = encode_reply(job.rid, 500, ServerError(
                f"internal error: {type(error).__name__}: {error}").to_body())
        if frame is not None:
            self._send_chunk(job, frame)
        self._pump_bulk()

    def _send_chunk(self, job: BulkJob, frame: bytes | bytearray) -> None:
        """A chunk reply, handed to ZeroMQ without a copy and tracked: it counts against its
        node's MAX_HELD_PER_NODE and MAX_CHUNKS_PER_NODE until ZeroMQ has written it out (or
        dropped it with its connection). A connection whose pipe is full (SEND_HWM) or gone gets
        nothing: the agent asks again after its chunk timeout (agent/modelcache.py)."""
        try:
            tracker = self.sock.send_multipart([job.ident, frame], zmq.NOBLOCK, copy=False, track=True)
        except zmq.ZMQError as e:
            log.info("model chunk reply for request %s of node [%s] dropped (%s): it asks again",
                     job.rid, job.node_id, e)
            return
        if tracker is not None and not tracker.done:
            self._bulk_held.setdefault(job.node_id, []).append(tracker)

    def on_rotate_node_key(self, ctx: Ctx, msg: m.RotateNodeKey) -> dict[str, Any]:
        """Move a node id to another agent key (admin). The agent running now keeps its
        connection; the next registration of that node id must come with the new key."""
        self._reload_keys()
        if self.curve is None:
            raise BadRequest("this coordinator runs without CURVE keys: there is no key to rotate")
        if self.keys.get(msg.public_key) != "agent":
            raise BadRequest(f"[public_key] [{msg.public_key}] is not an agent key in the authorized "
                             "keys file; add it there first")
        old = self.store.get_meta(f"node_key/{msg.node_id}")
        self.store.set_meta(f"node_key/{msg.node_id}", msg.public_key)
        log.info("node [%s] moved from agent key [%s] to [%s]", msg.node_id, old, msg.public_key)
        return {"node_id": msg.node_id, "public_key": msg.public_key, "previous_public_key": old}

    def _check_nodes(self) -> None:
        """Nodes not heard from for a node timeout are lost. Not while frames wait to be read
        (their heartbeats may be among them), for at most one more node timeout: an overloaded
        coordinator does not declare live nodes lost and bring on a storm of registrations."""
        now = self.clock.monotonic()
        if self._behind_since is not None and now - self._behind_since < self.cfg.node_timeout_s:
            log.warning("frames have been waiting to be read for %.1fs: node loss checks deferred",
                        now - self._behind_since)
            return
        lost = [n for n in self._alive() if now - n.last_seen > self.cfg.node_timeout_s]
        for n in lost:
            log.warning("node [%s] lost: no heartbeat for %.1fs", n.node_id, now - n.last_seen)
        if lost:
            self._lose(lost, "lost")
        self._forget_nodes(now)

    def _forget_nodes(self, now: float) -> None:
        """Nodes lost for NODE_FORGET_AFTER_S, and named by no deployment, are forgotten: their
        records and their node_capacity/node_key rows. Bounds what registrations leave behind."""
        named = {n for d in self.deployments.values() for n in (*d.targets, *d.warm)}
        for n in [n for n in self.nodes.values() if not n.alive and n.node_id not in named
                  and now - n.last_seen > NODE_FORGET_AFTER_S]:
            self.store.delete_meta(f"node_capacity/{n.node_id}")
            self.store.delete_meta(f"node_key/{n.node_id}")
            del self.nodes[n.node_id]
            self._sync_cache.pop(n.node_id, None)
            self._sync_packed.pop(n.node_id, None)
            log.info("node [%s] forgotten: lost for %.0fs", n.node_id, now - n.last_seen)

    def _lose(self, nodes: list[NodeRecord], why: str) -> None:
        for n in nodes:
            n.alive = False
            old, n.reports = n.reports, {}
            self.routing.node_gone(n.node_id, old)
            self.hb_memo.forget(n.ident)
            self.routing.dirty |= {d.deployment_id for d in self.deployments.values()
                                   if n.node_id in d.targets}
            self._node_of.pop(n.ident, None)
        self._rebalance(f"nodes {why}: " + ",".join(n.node_id for n in nodes))
        self._finish_stops()
        self._settle()

    # ---- models --------------------------------------------------------------------------------
    def on_put_model_chunk(self, ctx: Ctx, msg: m.PutModelChunk) -> dict[str, Any]:
        return self._offload(ctx, self.store.append_upload, msg.upload_id, msg.offset, msg.data,
                             then=lambda size: {"upload_id": msg.upload_id, "size": size})

    def on_put_model(self, ctx: Ctx, msg: m.PutModel) -> dict[str, Any]:
        if (p := id_problem("model_id", msg.model_id)):
            raise BadRequest(p)
        if msg.model_id in self.models:
            raise BadRequest(f"Trained machine learning model [{msg.model_id}] already exists",
                             type="resource_already_exists_exception")
        if msg.model_id in self.deployments:
            raise BadRequest(f"Model id [{msg.model_id}] is the id of an existing deployment")
        if msg.task not in TASKS:
            raise BadRequest(f"invalid [task] [{msg.task}]; must be one of [{','.join(TASKS)}]")
        if msg.task != "pass_through" and not msg.tokenizer:
            raise BadRequest(f"[tokenizer] is required for task [{msg.task}]")
        if (p := model_config_problem(msg.task, msg.model_config)):
            raise BadRequest(p)
        if not self.store.upload_path(msg.upload_id).exists():
            raise BadRequest(f"no upload [{msg.upload_id}]: send the model with put_model_chunk first")

        def place() -> tuple[int, Optional[str], dict]:  # on an Offload thread: hash, check, fsync, rename
            size = self.store.finish_upload(msg.upload_id, msg.sha256)
            tok = self.store.put_blob(msg.tokenizer, ".tokenizer.json") if msg.tokenizer else None
            return size, tok, model_config_with_format(self.store.model_path(msg.sha256), msg.model_config)

        def store(placed: tuple[int, Optional[str], dict]) -> dict[str, Any]:  # back on the loop
            size, tok_sha, model_config = placed
            if msg.model_id in self.models or msg.model_id in self.deployments:
                raise BadRequest(f"Trained machine learning model [{msg.model_id}] already exists",
                                 type="resource_already_exists_exception")
            rec = ModelRecord(msg.model_id, msg.sha256, size, msg.task, tok_sha, model_config,
                              self.clock.wall_ms())
            self.store.save_model(rec)  # the file is durable first, then its row
            self.models[rec.model_id] = rec
            log.info("stored model [%s] (%d bytes, sha256 %s, task %s)", rec.model_id, size,
                     rec.sha256, rec.task)
            return {"model_id": rec.model_id, "model_size_bytes": size, "task": rec.task,
                    "sha256": rec.sha256}
        return self._offload(ctx, place, then=store)

    def on_get_models(self, ctx: Ctx, msg: m.GetModels) -> dict[str, Any]:
        if msg.model_id is not None and msg.model_id not in ("_all", "*"):
            recs = [self._model(msg.model_id)]
        else:
            recs = sorted(self.models.values(), key=lambda r: r.model_id)
        return {"count": len(recs), "trained_model_configs": [r.config_body() for r in recs]}

    def on_delete_model(self, ctx: Ctx, msg: m.DeleteModel) -> dict[str, Any]:
        rec = self._model(msg.model_id)
        if any(d.model_id == rec.model_id for d in self.deployments.values()):
            raise Conflict(f"Cannot delete model [{rec.model_id}] as it is currently deployed")
        self.store.delete_model(rec)
        del self.models[rec.model_id]
        log.info("deleted model [%s]", rec.model_id)
        return {"acknowledged": True}

    # ---- deployments ---------------------------------------------------------------------------
    def on_start(self, ctx: Ctx, msg: m.StartDeployment) -> Any:
        p = validate_start(msg)
        if p.priority == "low":
            low_priority_rules(p.number_of_allocations, p.adaptive)
        model = self._model(p.model_id)
        if p.deployment_id in self.deployments:
            raise BadRequest("Could not start model deployment because an existing deployment with "
                             f"the same id [{p.deployment_id}] exist")
        if p.deployment_id in self.store.bad_rows:
            raise Conflict(f"[deployment_id] [{p.deployment_id}] has a stored record that could not be "
                           f"loaded ({self.store.bad_rows[p.deployment_id]}); an operator must repair "
                           f"or delete its row in {self.store.path} first")
        if p.deployment_id != p.model_id and p.deployment_id in self.models:
            raise BadRequest(f"Deployment id [{p.deployment_id}] is the same as an another model which "
                             "is not the model being deployed. Deployment id can be the same as the "
                             "model being deployed but cannot match a different model")
        dep = DeploymentRecord(
            deployment_id=p.deployment_id, model_id=model.model_id,
            number_of_allocations=p.number_of_allocations,
            threads_per_allocation=p.threads_per_allocation, queue_capacity=p.queue_capacity,
            priority=p.priority, cache_size=p.cache_size, adaptive=p.adaptive,
            start_time_ms=self.clock.wall_ms(), max_batch_size=p.max_batch_size,
            max_batch_delay_ms=p.max_batch_delay_ms)
        plan = self._plan({dep.deployment_id: self._plan_deployment(dep)})
        placed = plan.placed(dep.deployment_id)
        if placed == 0:
            raise TooManyRequests("Could not start deployment because no ML nodes with sufficient "
                                  "capacity were found")
        if placed < dep.number_of_allocations:
            raise TooManyRequests("Could not start deployment because there are not enough resources "
                                  "to provide all requested allocations")
        dep.routing_version = self._next_version()
        self.store.save_deployment(dep)  # the state file first: a failed write leaves nothing behind
        self.deployments[dep.deployment_id] = dep
        self._route_sigs[dep.deployment_id] = ()
        log.info("Started deployment [%s] of model [%s]: %d allocations x %d threads, priority %s",
                 dep.deployment_id, dep.model_id, dep.number_of_allocations,
                 dep.threads_per_allocation, dep.priority)
        self._apply(plan, f"model deployment [{dep.deployment_id}] started")
        return self._park(ctx, p.timeout_s,
                          lambda: self._start_progress(dep.deployment_id, p.wait_for),
                          lambda: self._start_timeout(dep.deployment_id, p.timeout_s),
                          tag=dep.deployment_id)

    def _start_progress(self, deployment_id: str, wait_for: str) -> Optional[tuple[int, dict]]:
        dep = self.deployments.get(deployment_id)
        if dep is None:
            raise BadRequest("Error waiting for the model deployment to start. The trained model "
                             "assignment was removed while waiting")
        routes = self._routes(dep)
        failed = {r.node_id: r.reason for r in routes if r.routing_state == RoutingState.FAILED}
        if failed:
            self._begin_stop(dep, force=True, finish_pending_work=False)
            raise ServerError("Could not start trained model deployment, the following nodes failed "
                              f"with errors [{', '.join(f'{k}: {v}' for k, v in sorted(failed.items()))}]")
        state = allocation_status(dep, routes)["state"]
        if wait_for_reached(wait_for, state):
            return 200, assignment_body(dep, self.models[dep.model_id], routes)
        return None

    def _start_timeout(self, deployment_id: str, timeout_s: float) -> tuple[int, dict]:
        e = RequestTimeout(
            f"Timed out after [{format_time(timeout_s)}] waiting for trained model deployment "
            f"[{deployment_id}] to start. Use the trained model stats API to track the state of the "
            "deployment and try again once it has started.")
        return e.status, e.to_body()

    def on_update(self, ctx: Ctx, msg: m.UpdateDeployment) -> dict[str, Any]:
        dep = self._deployment(msg.deployment_id)
        n, adaptive = validate_update(msg.number_of_allocations, msg.adaptive_allocations, dep.adaptive)
        if dep.priority == "low":
            low_priority_rules(n, adaptive)
        model = self.models[dep.model_id]
        routes = self._routes(dep)
        if (n is None or n == dep.number_of_allocations) and adaptive == dep.adaptive:
            return assignment_body(dep, model, routes)
        if assignment_state(dep, routes) != AssignmentState.STARTED:
            raise Conflict("cannot update deployment that is not in [started] state")
        if n is None and adaptive is not None and adaptive.enabled:
            # newly enabled or changed bounds apply at once; the scaler takes it from there
            lo = adaptive.min_number_of_allocations or 0
            hi = adaptive.max_number_of_allocations
            n = max(dep.number_of_allocations, lo)
            if hi is not None:
                n = min(n, hi)
        if n is not None and n != dep.number_of_allocations:
            self._set_allocations(dep, n, f"model deployment [{dep.deployment_id}] updated")
        self._commit(dep, adaptive=adaptive)
        return assignment_body(dep, model, self._routes(dep))

    def _set_allocations(self, dep: DeploymentRecord, n: int, why: str) -> None:
        """Change a deployment's allocations: an increase runs the planner (existing placements
        kept; 429 and no change when it cannot all be placed), a decrease takes allocations away
        without moving the rest, zero keeps the model hosts warm for a while."""
        if n == dep.number_of_allocations:
            return
        current = dict(dep.targets)
        if not current and dep.warm:  # scaling up from zero: where the model is still loaded
            current = {node: 1 for node in dep.warm}
        plan = self._plan({dep.deployment_id: self._plan_deployment(dep, n, current)})
        if n > dep.number_of_allocations and plan.placed(dep.deployment_id) < n:
            raise TooManyRequests("Could not update deployment because there are not enough "
                                  "resources to provide all requested allocations")
        warm = dep.warm
        if n == 0 and self.cfg.warm_zero_keep_s > 0:
            until = self.clock.wall_ms() + int(self.cfg.warm_zero_keep_s * 1000)
            warm = {node: until for node in dep.targets}
        elif n > 0:
            placed = plan.assignments.get(dep.deployment_id, {})
            warm = {k: v for k, v in dep.warm.items() if k not in placed}
        before = dep.number_of_allocations
        self._commit(dep, warm=warm, number_of_allocations=n)
        log.info("deployment [%s]: allocations %d -> %d (%s)", dep.deployment_id, before, n, why)
        self.routing.dirty.add(dep.deployment_id)
        self._apply(plan, why)

    def on_stop(self, ctx: Ctx, msg: m.StopDeployment) -> Any:
        dep = self.deployments.get(msg.deployment_id)
        if dep is None:
            if msg.allow_no_match:
                return {"stopped": True}
            raise NotFound(f"No known model deployment with id [{msg.deployment_id}]")
        self._begin_stop(dep, force=msg.force, finish_pending_work=msg.finish_pending_work)
        return self._park(ctx, self.cfg.stop_timeout_s,
                          lambda: None if dep.deployment_id in self.deployments else (200, {"stopped": True}),
                          lambda: self._force_remove(dep.deployment_id), tag=dep.deployment_id)

    def _begin_stop(self, dep: DeploymentRecord, *, force: bool, finish_pending_work: bool) -> None:
        if not dep.stopping:
            log.info("stopping deployment [%s] (force=%s, finish_pending_work=%s)",
                     dep.deployment_id, force, finish_pending_work)
        self._commit(dep, stopping=True, finish_pending_work=finish_pending_work and not force)
        self._stopping.add(dep.deployment_id)
        self.routing.dirty.add(dep.deployment_id)
        self._settle()
        for node_id in set(dep.targets) | self._reporting_nodes(dep):
            self._push_sync(node_id)
        self._finish_stops()

    def _finish_stops(self) -> None:
        """Forget stopping deployments that no live node runs any more."""
        done = [d for d in (self.deployments.get(i) for i in list(self._stopping))
                if d is not None and not self._reporting_nodes(d)]
        for dep in done:
            self._remove(dep)
        if done:
            self._rebalance("deployments stopped: " + ",".join(d.deployment_id for d in done))

    def _remove(self, dep: DeploymentRecord) -> None:
        self.store.delete_deployment(dep.deployment_id)
        self.deployments.pop(dep.deployment_id, None)
        self._route_sigs.pop(dep.deployment_id, None)
        self._stopping.discard(dep.deployment_id)
        self.routing.forget(dep.deployment_id)
        self.routing.dirty.add(dep.deployment_id)  # its waiters learn it is gone
        log.info("Stopped deployment [%s]", dep.deployment_id)
        for node_id in set(dep.targets) | {n.node_id for n in self._alive()}:
            self._push_sync(node_id)

    def _force_remove(self, deployment_id: str) -> tuple[int, dict]:
        dep = self.deployments.get(deployment_id)
        if dep is not None:
            log.warning("deployment [%s]: nodes %s did not confirm the stop in time; removing it",
                        deployment_id, sorted(self._reporting_nodes(dep)))
            self._remove(dep)
            self._rebalance(f"deployment [{deployment_id}] stopped")
        return 200, {"stopped": True}

    def on_clear_cache(self, ctx: Ctx, msg: m.DeploymentRef) -> dict[str, Any]:
        dep = self._deployment(msg.deployment_id)
        for node_id in self._reporting_nodes(dep):
            self._send(self.nodes[node_id].ident,
                       encode_request("clear_cache", 0, {"deployment_id": dep.deployment_id}))
        return {"cleared": True}

    def on_get_stats(self, ctx: Ctx, msg: m.GetStats) -> dict[str, Any]:
        if msg.deployment_id is not None and msg.deployment_id not in ("_all", "*"):
            dep = self.deployments.get(msg.deployment_id)
            if dep is None:
                deps = [d for d in self.deployments.values() if d.model_id == msg.deployment_id]
                if not deps:
                    raise NotFound(f"No known model deployment with id [{msg.deployment_id}]")
            else:
                deps = [dep]
        else:
            deps = sorted(self.deployments.values(), key=lambda d: d.deployment_id)
        entries = [deployment_stats_body(d, self.models[d.model_id], self._routes(d), self.nodes)
                   for d in deps]
        for e, d in zip(entries, deps, strict=True):
            model = self.models[d.model_id]
            e["model_size_stats"]["required_native_memory_bytes"] = planner.memory_estimate(
                model.size, d.cache_bytes(model))
        return {"count": len({d.model_id for d in deps}), "trained_model_stats": entries}

    def on_get_nodes(self, ctx: Ctx, msg: m.Empty) -> dict[str, Any]:
        on_node: dict[str, list[str]] = {}  # one pass over the routes, not nodes x deployments
        for d in sorted(self.deployments.values(), key=lambda d: d.deployment_id):
            for r in self._routes(d):
                if r.current_allocations > 0:
                    on_node.setdefault(r.node_id, []).append(d.deployment_id)
        return {"nodes": {n.node_id: n.body(on_node.get(n.node_id, []))
                          for n in sorted(self._alive(), key=lambda n: n.node_id)}}

    def on_await_routes(self, ctx: Ctx, msg: m.AwaitRoutes) -> Any:
        """A client found no allocation to send to. Answer with the routing table as soon as one
        serves (triggering one allocation if the deployment scaled to zero), 408 at the deadline."""
        dep = self._deployment(msg.deployment_id)
        dep_id = dep.deployment_id

        def ready() -> Optional[tuple[int, dict]]:
            d = self.deployments.get(dep_id)
            if d is None:
                raise NotFound(f"No known model deployment with id [{dep_id}]")
            if d.stopping:
                raise Conflict(f"Trained model deployment [{dep_id}] is [stopping]")
            routes = self._routes(d)
            if any(r.routable for r in routes):
                return 200, self.on_get_routing(ctx, m.DeploymentRef(dep_id))
            if routes and all(r.routing_state == RoutingState.FAILED for r in routes):
                raise ServiceUnavailable(f"[{dep_id}] every allocation has failed: " + "; ".join(
                    f"{r.node_id}: {r.reason}" for r in routes))
            return None

        now = ready()
        if now is not None:
            return now[1]
        if sum(1 for w in self.waiters if w.tag == dep_id) >= MAX_WAITING_FOR_ALLOCATION:
            raise TooManyRequests(f"Rejected inference request waiting for an allocation of deployment "
                                  f"[{dep_id}]. Too many pending requests")
        self.adaptive.request_at_zero(dep)
        timeout_s = msg.timeout_ms / 1000.0

        def timed_out() -> tuple[int, dict]:
            e = RequestTimeout(f"Timed out after [{format_time(timeout_s)}] waiting for trained model "
                               f"deployment [{dep_id}] to start. Use the trained model stats API to "
                               "track the state of the deployment and try again once it has started.")
            return e.status, e.to_body()
        return self._park(ctx, timeout_s, ready, timed_out, tag=dep_id)

    def on_get_routing(self, ctx: Ctx, msg: m.DeploymentRef) -> dict[str, Any]:
        dep = self._deployment(msg.deployment_id)
        routes = self._routes(dep)
        return {"deployment_id": dep.deployment_id, "version": dep.routing_version,
                "assignment_state": assignment_state(dep, routes).value,
                "routes": [{"node_id": r.node_id,
                            "address": self.nodes[r.node_id].transport_address,
                            "public_key": self.nodes[r.node_id].public_key,
                            "routing_state": r.routing_state.value,
                            "current_allocations": r.current_allocations}
                           for r in routes if r.routing_state in (RoutingState.STARTED,
                                                                   RoutingState.STOPPING)]}


def start(config: CoordinatorConfig) -> Coordinator:
    """Start-up: read the store and keys, bind. Errors here are configuration errors (the CLI
    exits with code 2); once ``run`` serves, nothing ends the daemon but a signal."""
    coord = Coordinator(config)
    signal.signal(signal.SIGTERM, coord.stop)
    signal.signal(signal.SIGINT, coord.stop)
    coord.bind()
    return coord

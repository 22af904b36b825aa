"""Many simulated agents in one process, for ``bench/scale.py``: one DEALER per node (no routing
id of its own, docs/protocol.md §1.2) speaking the real agent protocol to a real coordinator.

    python -m bench._scale_agents --endpoint tcp://127.0.0.1:PORT --nodes 1000 --out DIR

Each node registers (at most ``--register-window`` registrations in flight), then heartbeats
every ``heartbeat_interval_s`` of its last sync body, the phases spread evenly over the
interval. Its ``deployments`` mirror what the last sync assigned to it: a deployment whose model
it has fetched is ``started`` with ``current_allocations = target``, one whose model is still
being fetched is ``starting``, one no longer assigned (or ``stopping``) is reported ``stopping``
once and then dropped. Like the real agent it fetches each assigned model once (``model_chunk``,
4 MiB chunks, 4 in flight after the first; the bytes are counted, not kept) on a second DEALER of
its own, the bulk connection, with the ``bulk_token`` of its register reply (opened at its first
fetch; ``--chunks-on-main`` sends them on the main connection instead, as agents did before), and
heartbeats at once when a deployment's state changes. Nothing else is answered.

Events come from one epoll over every socket's ``ZMQ_FD`` (a zmq.Poller over thousands of
sockets costs a scan of all of them per call); a main socket is drained while its ``ZMQ_EVENTS``
says POLLIN, and again after each send, since a send may consume the fd's edge. Like the agent,
which reads its main connection before its bulk one at each turn, the simulator (whose bulk
sockets have a ZeroMQ context, so an I/O thread, of their own) reads every
ready main socket first and then at most ``BULK_SLICE`` chunk replies per turn (bulk sockets
with more waiting are kept in a backlog and visited again): one process stands in for up to 50
fetching hosts here, and a fetcher's heartbeat reply would otherwise wait for the receiving of
other nodes' chunks, a cost of the simulator that no single agent has.

Control: JSON lines on stdin (``{"cmd": "status"}``, ``{"cmd": "dump"}``, ``{"cmd": "stop"}``),
one JSON line answered on stdout for each. ``dump`` writes ``DIR/PREFIX-samples.json``: every heartbeat
round trip as ``[sent at (time.monotonic), round trip ms, 1 if the node was fetching a model
when it sent it else 0]``, and registrations as ``[sent at, round trip ms]``. Every
loop is bounded: the process exits by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import selectors
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from mlfleet.common.protocol import MAX_MESSAGE_BYTES, Reply, encode_request, unpack

CHUNK = 4 << 20
WINDOW = 4
BULK_SLICE = 4  # chunk replies read per loop turn, between two reads of the main sockets
GIB = 1 << 30
STATS = {"inference_count": 0, "error_count": 0, "timeout_count": 0, "rejected_execution_count": 0,
         "number_of_pending_requests": 0, "average_inference_time_ms": 0.0}


@dataclass
class Fetch:
    sha: str
    size: int = -1          # unknown until the first chunk comes back
    next_offset: int = 0
    received: int = 0
    inflight: int = 0


@dataclass
class Sim:
    index: int
    node_id: str
    sock: zmq.Socket
    bulk: Any = None        # the bulk connection (a DEALER), opened at the first fetch
    bulk_token: str = ""    # from the register reply
    registered: bool = False
    registering: bool = False
    gen: int = 0  # bumped at each registration: older heartbeat timers are dropped
    assignments: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)   # deployment -> routing state reported
    have: set[str] = field(default_factory=set)             # model sha256s fetched
    fetches: dict[str, Fetch] = field(default_factory=dict)
    pending: dict[int, tuple[str, float, Any]] = field(default_factory=dict)  # rid -> (op, t0, info)


class Sims:
    def __init__(self, endpoint: str, nodes: int, processors: int, register_window: int,
                 out: Path, max_seconds: float, prefix: str = "sim", chunks_on_main: bool = False) -> None:
        self.endpoint, self.out, self.prefix = endpoint, out, prefix
        self.chunks_on_main = chunks_on_main
        self.deadline = time.monotonic() + max_seconds
        self.processors = processors
        self.register_window = register_window
        self.interval = 1.0
        self.ctx = zmq.Context(io_threads=1)
        self.ctx.set(zmq.MAX_SOCKETS, nodes + 64)  # a context option (the default is 1023)
        # bulk sockets in a context of their own: its I/O thread reads the chunks (megabytes at a
        # time) while the main one reads heartbeat replies, as two hosts' would not wait for each other
        self.bulk_ctx = zmq.Context(io_threads=1)
        self.bulk_ctx.set(zmq.MAX_SOCKETS, nodes + 64)
        self.sel = selectors.DefaultSelector()
        self.sims: list[Sim] = []
        self.by_fd: dict[int, tuple[Sim, bool]] = {}  # fd -> (node, its bulk socket?)
        self.backlog: dict[int, Sim] = {}  # nodes whose bulk socket may hold replies (in order)
        for i in range(nodes):
            sim = Sim(i, f"{prefix}-{i:04d}", self.dealer())
            self.sims.append(sim)
            self.watch(sim, sim.sock)
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
        self.timers: list[tuple[float, int, int, int]] = []  # (due, seq, sim index, gen)
        self.seq = 0
        self.rid = 0
        self.to_register: list[int] = list(range(nodes))[::-1]
        self.hb: list[tuple[float, float, int]] = []
        self.reg: list[tuple[float, float]] = []
        self.counts = {"reregister": 0, "errors": 0, "send_again": 0, "chunks": 0,
                       "chunk_bytes": 0, "stale_dropped": 0, "fetched": 0, "no_reply": 0}
        self.reg_inflight: set[int] = set()
        self.dirty: set[int] = set()  # nodes whose state changed since their last heartbeat
        self.stdin_buf = b""
        self.next_sweep = time.monotonic() + 5
        self.running = True

    def dealer(self, bulk: bool = False) -> zmq.Socket:
        s = (self.bulk_ctx if bulk else self.ctx).socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.connect(self.endpoint)
        return s

    def watch(self, sim: Sim, sock: zmq.Socket) -> None:
        fd = sock.getsockopt(zmq.FD)
        self.by_fd[fd] = (sim, sock is sim.bulk)
        self.sel.register(fd, selectors.EVENT_READ)

    # ---- sending --------------------------------------------------------------------------
    def send(self, sim: Sim, op: str, body: dict[str, Any], info: Any = None, bulk: bool = False) -> None:
        self.rid += 1
        try:
            (sim.bulk if bulk else sim.sock).send(encode_request(op, self.rid, body), zmq.NOBLOCK)
        except zmq.Again:
            self.counts["send_again"] += 1
            return
        sim.pending[self.rid] = (op, time.monotonic(), info)
        self.drain(sim)  # a send may have consumed the fd's edge
        if bulk:
            self.backlog[sim.index] = sim

    def register(self, sim: Sim) -> None:
        sim.registering = True
        self.reg_inflight.add(sim.index)
        self.send(sim, "register", {
            "node_id": sim.node_id, "hostname": sim.node_id,
            "transport_address": f"tcp://127.0.0.1:{10000 + sim.index}",
            "allocated_processors": self.processors,
            "cpu": {"physical": self.processors, "logical": self.processors},
            "memory": {"total_bytes": 64 * GIB, "available_bytes": 60 * GIB},
            "pid": os.getpid(), "deployments": self.report_list(sim)})

    def report_list(self, sim: Sim) -> list[dict[str, Any]]:
        out = []
        for dep, state in sim.reports.items():
            a = sim.assignments.get(dep)
            target = a["target_allocations"] if a else 0
            out.append({"deployment_id": dep, "routing_state": state,
                        "current_allocations": target if state == "started" else 0,
                        "target_allocations": target, "stats": STATS})
        return out

    def heartbeat(self, sim: Sim) -> None:
        self.dirty.discard(sim.index)
        self.send(sim, "heartbeat", {"node_id": sim.node_id,
                                     "memory": {"total_bytes": 64 * GIB, "available_bytes": 60 * GIB},
                                     "deployments": self.report_list(sim)}, int(bool(sim.fetches)))
        # reported "stopping" once: drop it now (the node has stopped it)
        for dep in [d for d, s in sim.reports.items() if s == "stopping"]:
            del sim.reports[dep]
            self.dirty.add(sim.index)  # the next heartbeat no longer lists it

    def schedule(self, sim: Sim, due: float) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (due, self.seq, sim.index, sim.gen))

    # ---- receiving ------------------------------------------------------------------------
    def drain(self, sim: Sim) -> None:
        for _ in range(10_000):  # bounded: a socket holds at most RCVHWM messages
            if not sim.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            self.on_frame(sim, sim.sock.recv(zmq.NOBLOCK, copy=False))

    def read_bulk(self) -> None:
        """At most BULK_SLICE chunk replies, one per node in turn; nodes with none left leave
        the backlog."""
        n = 0
        for i, sim in list(self.backlog.items()):
            if n >= BULK_SLICE:
                return
            del self.backlog[i]
            if sim.bulk is None or not sim.bulk.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                continue
            self.on_frame(sim, sim.bulk.recv(zmq.NOBLOCK, copy=False))
            n += 1
            self.backlog[i] = sim  # maybe more: visited again after the others

    def sweep(self, now: float) -> None:
        """Forget requests unanswered for 30 s (counted); a lost registration is sent again."""
        self.next_sweep = now + 5
        for sim in self.sims:
            for rid in [r for r, (_, t0, _) in sim.pending.items() if now - t0 > 30]:
                op, _, info = sim.pending.pop(rid)
                self.counts["no_reply"] += 1
                if op == "register":
                    sim.registering = False
                    self.reg_inflight.discard(sim.index)
                    self.to_register.append(sim.index)
                elif op == "model_chunk":
                    sim.fetches.pop(info.sha, None)

    def on_frame(self, sim: Sim, frame: zmq.Frame) -> None:
        msg = unpack(frame.buffer)
        if not isinstance(msg, dict):
            return
        if "op" in msg:  # a push
            if msg["op"] == "sync":
                self.apply_sync(sim, msg.get("body") or {})
            return
        rep = Reply(id=msg.get("id", 0), status=msg.get("status", 0), body=msg.get("body") or {})
        entry = sim.pending.pop(rep.id, None)
        if entry is None:
            self.counts["stale_dropped"] += 1
            return
        op, t0, info = entry
        now = time.monotonic()
        if op == "model_chunk":
            self.on_chunk(sim, rep, info)
            return
        if rep.status != 200:
            self.counts["errors"] += 1
            if op == "register":
                sim.registering = False
                self.reg_inflight.discard(sim.index)
                self.to_register.append(sim.index)
            return
        if op == "register":
            self.reg.append((t0, (now - t0) * 1000))
            sim.registering, sim.registered = False, True
            sim.bulk_token = str(rep.body.get("bulk_token") or "")
            self.reg_inflight.discard(sim.index)
            sim.gen += 1
            self.apply_sync(sim, rep.body)
            self.schedule(sim, time.monotonic() + self.interval * ((sim.index * 0.618034) % 1.0))
        elif op == "heartbeat":
            self.hb.append((t0, (now - t0) * 1000, info))
            if rep.body.get("reregister"):
                self.counts["reregister"] += 1
                sim.registered = False
                if not sim.registering:
                    self.to_register.append(sim.index)
                return
            self.apply_sync(sim, rep.body)

    def apply_sync(self, sim: Sim, body: dict[str, Any]) -> None:
        if "assignments" not in body:
            return
        self.interval = float(body.get("heartbeat_interval_s", self.interval))
        new: dict[str, dict[str, Any]] = {}
        for a in body["assignments"]:
            if a.get("stopping") or a.get("target_allocations", 0) <= 0:
                continue
            new[a["deployment_id"]] = a
        changed = False
        for dep in list(sim.reports):
            if dep not in new and sim.reports[dep] != "stopping":
                sim.reports[dep] = "stopping"
                changed = True
        for dep, a in new.items():
            old = sim.assignments.get(dep)
            want = "started" if a["sha256"] in sim.have else "starting"
            if sim.reports.get(dep) != want or (old and old["target_allocations"] != a["target_allocations"]):
                sim.reports[dep] = want
                changed = True
            if want == "starting" and a["sha256"] not in sim.fetches:
                self.start_fetch(sim, a["sha256"])
        sim.assignments = new
        if changed:
            self.dirty.add(sim.index)

    def start_fetch(self, sim: Sim, sha: str) -> None:
        f = sim.fetches[sha] = Fetch(sha)
        self.request_chunk(sim, f)

    def request_chunk(self, sim: Sim, f: Fetch) -> None:
        f.inflight += 1
        offset = f.next_offset
        f.next_offset += CHUNK
        body = {"sha256": f.sha, "offset": offset, "length": CHUNK}
        if self.chunks_on_main or not sim.bulk_token:
            self.send(sim, "model_chunk", body, f)
            return
        if sim.bulk is None:
            sim.bulk = self.dealer(bulk=True)
            self.watch(sim, sim.bulk)
        self.send(sim, "model_chunk", {**body, "node_id": sim.node_id, "bulk_token": sim.bulk_token}, f,
                  bulk=True)

    def on_chunk(self, sim: Sim, rep: Any, f: Fetch) -> None:
        f.inflight -= 1
        if rep.status != 200:  # e.g. 503 while re-registering: start over at the next sync
            self.counts["errors"] += 1
            sim.fetches.pop(f.sha, None)
            return
        self.counts["chunks"] += 1
        self.counts["chunk_bytes"] += len(rep.body["data"])
        f.received += len(rep.body["data"])
        f.size = rep.body["size"]
        while f.inflight < WINDOW and f.next_offset < f.size:
            self.request_chunk(sim, f)
        if f.received >= f.size and f.inflight == 0:
            sim.fetches.pop(f.sha, None)
            sim.have.add(f.sha)
            self.counts["fetched"] += 1
            for dep, a in sim.assignments.items():
                if a["sha256"] == f.sha and sim.reports.get(dep) == "starting":
                    sim.reports[dep] = "started"
                    self.dirty.add(sim.index)

    # ---- control --------------------------------------------------------------------------
    def on_stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            cmd = json.loads(line)["cmd"]
            if cmd == "stop":
                self.running = False
                answer: dict[str, Any] = {"ok": True}
            elif cmd == "dump":
                samples = {"hb": self.hb, "reg": self.reg}
                (self.out / f"{self.prefix}-samples.json").write_text(json.dumps(samples))
                answer = {"ok": True}
            else:
                answer = {"registered": sum(s.registered for s in self.sims),
                          "heartbeats": len(self.hb), "fetching": sum(len(s.fetches) for s in self.sims),
                          **self.counts}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()

    def run(self) -> None:
        while self.running and time.monotonic() < self.deadline:
            now = time.monotonic()
            while self.to_register and len(self.reg_inflight) < self.register_window:
                self.register(self.sims[self.to_register.pop()])
            for _ in range(len(self.timers)):
                if not self.timers or self.timers[0][0] > now:
                    break
                due, _seq, i, gen = heapq.heappop(self.timers)
                sim = self.sims[i]
                if not sim.registered or gen != sim.gen:
                    continue  # re-registering: its schedule starts again when it has
                self.heartbeat(sim)
                self.schedule(sim, max(due + self.interval, now))
            for i in list(self.dirty):
                if self.sims[i].registered:
                    self.heartbeat(self.sims[i])  # a state changed: tell the coordinator now
            if now >= self.next_sweep:
                self.sweep(now)
            wait = min(0.2, max(0.0, self.timers[0][0] - time.monotonic())) if self.timers else 0.05
            for key, _ in self.sel.select(0 if self.backlog else wait):
                if key.fd == sys.stdin.fileno():
                    self.on_stdin()
                    continue
                sim, bulk = self.by_fd[key.fd]
                if bulk:
                    self.backlog[sim.index] = sim
                else:
                    self.drain(sim)
            self.read_bulk()
        for s in self.sims:
            s.sock.close(0)
            if s.bulk is not None:
                s.bulk.close(0)
        self.ctx.term()
        self.bulk_ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--processors", type=int, default=8)
    ap.add_argument("--register-window", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--prefix", default="sim", help="node ids are PREFIX-0000, PREFIX-0001, ...")
    ap.add_argument("--chunks-on-main", action="store_true",
                    help="ask for model chunks on the main connection (no bulk connection)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.nodes + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    Sims(args.endpoint, args.nodes, args.processors, args.register_window, args.out,
         args.max_seconds, args.prefix, args.chunks_on_main).run()


if __name__ == "__main__":
    main()

"""Hostile frames: what a 64 MiB msgpack frame of empty maps costs a daemon, against what the same
frame cost before authorization came before decoding (a plain ``msgpack.unpackb``, as the
daemons did twice per frame), measured in the same run.

    .venv/bin/python -m bench.frames [--mib 64]

Rows: the frame from a key the coordinator does not know (CURVE on: refused before any decode),
and from a peer on loopback without keys (trusted with a decode, within the op's limits), each
to the coordinator and to an agent's inference endpoint; the baseline decodes the frame in a
child process. Each daemon's RSS is sampled every 5 ms while the frame is handled; the daemon
must still answer afterwards. Target: growth below twice the frame for the unknown key.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import psutil
import zmq

from bench._util import table
from mlfleet.common.protocol import PROTOCOL_VERSION, decode_reply, encode_request
from mlfleet.common.security import generate_keys, load_public, load_secret
from tests.helpers import Cluster


def hostile_frame(mib: int, op: str) -> bytes:
    """``{"v", "op", "id", "body": {"docs": [{}, {}, ...]}}``: almost every byte an empty map."""
    n = (mib << 20) - 4096  # just under MAXMSGSIZE with CURVE's few bytes of framing
    env = msgpack.packb({"v": PROTOCOL_VERSION, "op": op, "id": 1})
    body = b"\x81" + msgpack.packb("docs") + b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    # the envelope map grows by one key: "body"
    return bytes([env[0] + 1]) + env[1:] + msgpack.packb("body") + body


def _baseline(frame_path: str, q: mp.Queue) -> None:
    frame = Path(frame_path).read_bytes()
    before = psutil.Process().memory_info().rss
    obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    q.put(psutil.Process().memory_info().rss - before)
    del obj


def baseline(frame: bytes) -> int:
    with tempfile.NamedTemporaryFile() as f:
        f.write(frame)
        f.flush()
        q: mp.Queue = mp.Queue()
        p = mp.Process(target=_baseline, args=(f.name, q))
        p.start()
        grown = q.get(timeout=300)
        p.join(60)
        return grown


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)


def send(endpoint: str, frame: bytes, curve: tuple[bytes, bytes, bytes] | None) -> int | None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve
    s.connect(endpoint)
    try:
        s.send(frame)
        if s.poll(120_000):
            return decode_reply(s.recv()).status
        return None
    finally:
        s.close(0)


def measure(pid: int, endpoint: str, frame: bytes, curve, ping_curve) -> tuple[int, int, str]:
    sampler = Sampler(pid)
    sampler.start()
    status = send(endpoint, frame, curve)
    time.sleep(0.2)  # a last few samples after the answer (measurement, not synchronisation)
    sampler.stop.set()
    sampler.join()
    alive = send(endpoint, encode_request("ping", 2, {}), ping_curve)
    return sampler.peak - sampler.base, status or 0, "yes" if alive in (200, 401, 403) else f"no ({alive})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    frame_c, frame_a = hostile_frame(args.mib, "get_stats"), hostile_frame(args.mib, "infer")
    mb = 1 << 20
    rows = [["before: plain msgpack.unpackb of the frame (once; the daemons decoded it twice)", "-",
             f"{baseline(frame_a) / mb:.0f}", "-", "-"]]
    with tempfile.TemporaryDirectory(prefix="mlfleet-bench-") as d:
        d = Path(d)
        keys = {n: generate_keys(n, d / "keys") for n in ("coordinator", "agent", "admin", "stranger")}
        z85 = {n: load_public(p).decode() for n, (_, p) in keys.items()}
        (d / "authorized_keys").write_text(f"admin {z85['admin']}\nagent {z85['agent']}\n")
        c = Cluster(d)
        try:
            c.start_coordinator(extra=["--curve-secret-key", str(keys["coordinator"][0]),
                                       "--authorized-keys", str(d / "authorized_keys")])
            c.start_agent("node-a", 2, extra=["--curve-secret-key", str(keys["agent"][0]),
                                              "--coordinator-public-key", str(keys["coordinator"][1])])
            stranger = (*load_secret(keys["stranger"][0]),)
            admin = (*load_secret(keys["admin"][0]),)
            coordinator, agent = c.coordinator, c.agents["node-a"]
            for name, pid, endpoint, server_key, frame in (
                    ("coordinator", coordinator.pid, coordinator.endpoint, keys["coordinator"][1], frame_c),
                    ("agent", agent.pid, agent.endpoint, keys["agent"][1], frame_a)):
                sk = load_public(server_key)
                grown, status, alive = measure(pid, endpoint, frame, (stranger[0], stranger[1], sk),
                                               (admin[0], admin[1], sk))
                rows.append([f"unknown key (CURVE) -> {name}", status, f"{grown / mb:.0f}",
                             f"{grown / len(frame):.2f}", alive])
        finally:
            c.shutdown()
        c = Cluster(d / "plain")
        os.makedirs(d / "plain", exist_ok=True)
        try:
            c.start_coordinator()
            c.start_agent("node-a", 2)
            coordinator, agent = c.coordinator, c.agents["node-a"]
            for name, pid, endpoint, frame in (
                    ("coordinator", coordinator.pid, coordinator.endpoint, frame_c),
                    ("agent", agent.pid, agent.endpoint, frame_a)):
                grown, status, alive = measure(pid, endpoint, frame, None, None)
                rows.append([f"loopback peer, no keys (decoded within limits) -> {name}", status,
                             f"{grown / mb:.0f}", f"{grown / len(frame):.2f}", alive])
        finally:
            c.shutdown()
    print(table(f"A {args.mib} MiB frame of empty maps ({len(frame_a)} bytes)",
                ["sender -> daemon", "status", "RSS growth MiB", "growth / frame", "still serving"], rows))


if __name__ == "__main__":
    main()

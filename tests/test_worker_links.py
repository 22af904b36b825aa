"""The agent <-> worker streams (agent/links.py): a worker says who it is, then its messages reach
the agent's handler; a stream that breaks the framing or does not say who it is is closed and
nothing else is disturbed; writes never block the agent's loop. Then the same against a real
agent: a peer on its worker socket that sends garbage does not stop it serving."""

from __future__ import annotations

import os
import socket
import struct

import numpy as np
import psutil
import pytest
import torch
import zmq

from mlfleet.agent.links import WorkerLinks
from mlfleet.common import stream
from mlfleet.common.errors import ServerError
from mlfleet.common.protocol import MAX_MESSAGE_BYTES
from tests.helpers import Mlp, running_cluster, save_model

pytestmark = pytest.mark.timeout(120)


class Huge(torch.nn.Module):
    """An output larger than one frame may be (64 MiB): 68 MB of float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(17_000_000) + x.sum()


class Harness:
    def __init__(self, path: str) -> None:
        self.poller = zmq.Poller()
        self.got: list[tuple[bytes, list[bytes]]] = []
        self.links = WorkerLinks(path, self.poller,
                                 lambda ident, frames: self.got.append((ident, [bytes(f) for f in frames])))
        self.links.bind()

    def turn(self, timeout_ms: int = 1000) -> None:
        for fd, ev in self.poller.poll(timeout_ms):
            assert self.links.handles(fd)
            self.links.on_event(fd, ev)

    def until(self, cond, turns: int = 200) -> None:
        for _ in range(turns):
            if cond():
                return
            self.turn(50)
        raise AssertionError("condition not reached")


@pytest.fixture
def harness(tmp_path):
    h = Harness(str(tmp_path / "w.sock"))
    yield h
    h.links.close()


def connect(h: Harness) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(h.links.path)
    return s


def test_a_worker_says_who_it_is_then_talks_both_ways(harness):
    s = connect(harness)
    stream.send_blocking(s, [b"dep|node|w1"])
    stream.send_blocking(s, [b"header", b"payload"])
    harness.until(lambda: harness.got)
    assert harness.got == [(b"dep|node|w1", [b"header", b"payload"])]
    assert harness.links.send(b"dep|node|w1", [b"run", b"docs"])
    r = stream.Reader(s)
    msgs = []
    while not msgs:
        msgs = r.read()
    assert [bytes(f) for f in msgs[0]] == [b"run", b"docs"]
    assert not harness.links.send(b"dep|node|nobody", [b"x"])  # not connected: nothing sent
    s.close()


@pytest.mark.parametrize("first", [
    [struct.pack("<I", 0)],                                     # zero frames
    [struct.pack("<3I", 2, 1 << 31, 0)],                        # past the byte limit
    [b"".join(bytes(v) for v in stream.encode([b"no-pipes"]))],  # not an identity
    [b"".join(bytes(v) for v in stream.encode([b"a|b|c", b"two frames"]))],
])
def test_a_stream_that_breaks_the_rules_is_closed_and_others_go_on(harness, first):
    good = connect(harness)
    stream.send_blocking(good, [b"dep|node|good"])
    bad = connect(harness)
    for chunk in first:
        bad.sendall(chunk)
    bad.settimeout(10)
    harness.until(lambda: len(harness.links.by_fd) == 1)  # the bad one is gone
    assert bad.recv(1) == b""                             # closed on it
    stream.send_blocking(good, [b"still", b"here"])
    harness.until(lambda: harness.got)
    assert harness.got == [(b"dep|node|good", [b"still", b"here"])]
    good.close()
    bad.close()


def test_who_may_speak_as_a_worker_is_decided_by_the_kernels_pid(tmp_path):
    asked: list[tuple[bytes, int]] = []

    def authorize(identity: bytes, pid: int) -> str | None:
        asked.append((identity, pid))
        return None if identity.startswith(b"ok|") else "not this one"

    poller = zmq.Poller()
    got: list = []
    links = WorkerLinks(str(tmp_path / "w.sock"), poller, lambda i, f: got.append(i), authorize)
    links.bind()
    try:
        socks = []
        for ident in (b"ok|node|w1", b"no|node|w1"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(links.path)
            stream.send_blocking(s, [ident])
            stream.send_blocking(s, [b"hello"])
            socks.append(s)
        for _ in range(200):
            if len(asked) == 2 and got:
                break
            for fd, ev in poller.poll(50):
                links.on_event(fd, ev)
        assert asked == [(b"ok|node|w1", os.getpid()), (b"no|node|w1", os.getpid())]
        assert got == [b"ok|node|w1"] and list(links.by_identity) == [b"ok|node|w1"]
        socks[1].settimeout(10)
        assert socks[1].recv(1) == b""
        for s in socks:
            s.close()
    finally:
        links.close()


def test_a_reconnecting_worker_replaces_its_old_stream(harness):
    old = connect(harness)
    stream.send_blocking(old, [b"dep|node|w"])
    harness.until(lambda: b"dep|node|w" in harness.links.by_identity)
    first = harness.links.by_identity[b"dep|node|w"]
    new = connect(harness)
    stream.send_blocking(new, [b"dep|node|w"])
    harness.until(lambda: harness.links.by_identity[b"dep|node|w"] is not first)
    assert len(harness.links.by_fd) == 1
    old.settimeout(10)
    assert old.recv(1) == b""
    assert harness.links.send(b"dep|node|w", [b"to the new one"])
    r = stream.Reader(new)
    msgs = []
    while not msgs:
        msgs = r.read()
    assert [bytes(f) for f in msgs[0]] == [b"to the new one"]
    old.close()
    new.close()


def test_writes_to_a_slow_worker_wait_without_blocking(harness):
    s = connect(harness)
    stream.send_blocking(s, [b"dep|node|slow"])
    harness.until(lambda: b"dep|node|slow" in harness.links.by_identity)
    big = bytes(4 << 20)
    for _ in range(3):  # 12 MB: far more than the socket buffers take
        assert harness.links.send(b"dep|node|slow", [b"h", big])
    assert harness.links.by_identity[b"dep|node|slow"].writer.pending
    r = stream.Reader(s)
    s.setblocking(False)
    got = []
    for _ in range(10_000):
        harness.turn(0)  # POLLOUT drains what waits
        got += r.read()
        if len(got) == 3:
            break
    assert [len(bytes(m[1])) for m in got] == [4 << 20] * 3
    assert not harness.links.by_identity[b"dep|node|slow"].writer.pending
    s.close()


def test_garbage_on_a_real_agents_worker_socket_does_not_stop_it(tmp_path):
    with running_cluster(tmp_path, {"node-a": 1}) as c, c.client() as client:
        client.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
        client.start_deployment("mlp", wait_for="started", timeout="60s")
        x = np.ones((1, 8), np.float32)
        before = client.infer("mlp", [{"input": x}])
        agent = psutil.Process(c.agents["node-a"].pid)
        paths = [u.laddr for u in agent.net_connections(kind="unix") if str(u.laddr).endswith("workers.sock")]
        assert paths, agent.net_connections(kind="unix")
        for garbage in (struct.pack("<I", 0), struct.pack("<3I", 2, 1 << 31, 0), b"\xff" * 64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(paths[0])
            s.sendall(garbage)
            s.settimeout(10)
            assert s.recv(1) == b""  # the agent closed it
            s.close()
        # says it is one of the deployment's workers: it is not a child of that model host
        impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        impostor.connect(paths[0])
        stream.send_blocking(impostor, [b"mlp|node-a|w1"])
        impostor.settimeout(10)
        assert impostor.recv(1) == b""  # refused
        impostor.close()
        after = client.infer("mlp", [{"input": x}])
        np.testing.assert_array_equal(before["inference_results"][0]["predicted_value"],
                                      after["inference_results"][0]["predicted_value"])
        assert c.agents["node-a"].proc.poll() is None  # still running (is_running is true of a zombie)


def test_a_result_larger_than_a_frame_fails_its_request_and_nothing_else(tmp_path):
    """A client's socket drops a connection that sends a frame past 64 MiB: the agent answers 500
    instead of relaying it, and the deployment keeps serving."""
    with running_cluster(tmp_path, {"node-a": 1}) as c, c.client() as client:
        client.put_model("huge", save_model(Huge(), c.workdir / "huge.pt"))
        client.start_deployment("huge", wait_for="started", timeout="60s")
        with pytest.raises(ServerError) as e:
            client.infer("huge", [{"input": np.ones(2, np.float32)}], timeout="60s")
        assert e.value.status == 500
        assert f"at most [{MAX_MESSAGE_BYTES}] bytes go in one frame" in e.value.reason
        with pytest.raises(ServerError):  # again: the worker and the agent are still there
            client.infer("huge", [{"input": np.ones(2, np.float32)}], timeout="60s")


# ---- a dying, silent or hostile peer --------------------------------------------------------

def test_a_worker_that_dies_with_bytes_still_queued_is_dropped_and_the_loop_goes_on(harness):
    s = connect(harness)
    stream.send_blocking(s, [b"dep|node|w1"])
    harness.until(lambda: b"dep|node|w1" in harness.links.by_identity)
    assert harness.links.send(b"dep|node|w1", [b"x" * (8 << 20)])  # most of it waits in the writer
    assert harness.links.by_identity[b"dep|node|w1"].writer.pending
    s.close()  # the worker dies (crash, OOM, SIGKILL) before it read it
    harness.until(lambda: b"dep|node|w1" not in harness.links.by_identity)  # a turn never raises
    assert harness.links.by_fd == {}


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_a_stream_that_has_not_said_who_it_is_cannot_make_the_agent_allocate(harness):
    before = _rss()
    socks = [connect(harness) for _ in range(3)]
    for s in socks:  # each claims one frame of 512 MiB and sends nothing more
        s.sendall(struct.pack("<2I", 1, 512 << 20))
    harness.until(lambda: harness.links.accepted == 3 and not harness.links.by_fd)  # all refused
    assert _rss() - before < 64 << 20
    for s in socks:
        s.close()


def test_a_large_message_takes_memory_as_its_bytes_arrive(harness):
    s = connect(harness)
    stream.send_blocking(s, [b"dep|node|w1"])
    harness.until(lambda: b"dep|node|w1" in harness.links.by_identity)
    before = _rss()
    import threading  # the agent's side reads in this thread: the worker writes from another
    t = threading.Thread(target=s.sendall, args=(struct.pack("<2I", 1, 900 << 20) + b"x" * (1 << 20),))
    t.start()  # claims 900 MiB, sends 1 MiB
    harness.until(lambda: not t.is_alive())
    for _ in range(5):
        harness.turn(20)
    assert _rss() - before < 128 << 20
    assert b"dep|node|w1" in harness.links.by_identity  # within the limits: still open
    s.close()


def test_streams_that_never_say_who_they_are_are_bounded_and_expire(harness):
    from mlfleet.agent import links as links_mod
    n = links_mod.MAX_UNIDENTIFIED + 5
    socks = [connect(harness) for _ in range(n)]
    harness.until(lambda: harness.links.accepted == n)
    assert len(harness.links.by_fd) == links_mod.MAX_UNIDENTIFIED  # the oldest went first
    ok = connect(harness)
    stream.send_blocking(ok, [b"dep|node|w1"])
    harness.until(lambda: b"dep|node|w1" in harness.links.by_identity)
    harness.links.tick(harness.links.clock() + links_mod.IDENTIFY_WITHIN_S + 1)
    assert list(harness.links.by_identity) == [b"dep|node|w1"]  # identified: kept
    assert len(harness.links.by_fd) == 1                          # the silent ones: closed
    for s in [*socks, ok]:
        s.close()


def test_a_worker_that_does_not_read_what_it_is_sent_is_closed(harness):
    from mlfleet.agent import links as links_mod
    s = connect(harness)
    stream.send_blocking(s, [b"dep|node|w1"])
    harness.until(lambda: b"dep|node|w1" in harness.links.by_identity)
    chunk = bytes(64 << 20)  # the same buffer each time: the writer holds references, not copies
    sent = 0
    while harness.links.send(b"dep|node|w1", [chunk]):
        sent += 1
        assert sent * len(chunk) <= links_mod.MAX_WAITING_BYTES + len(chunk)
    assert b"dep|node|w1" not in harness.links.by_identity and not harness.links.by_fd
    s.close()


def test_out_of_fds_the_agent_pauses_accepting_instead_of_spinning(tmp_path):
    """In a child process with a low fd limit: connections past it wait in the backlog, and the
    listener is not polled again until the pause is over (it was, in a tight loop, before)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent(f'''
        import os, resource, socket, time, zmq
        from mlfleet.agent import links as L
        from mlfleet.common import stream
        poller = zmq.Poller()
        w = L.WorkerLinks({str(tmp_path / "w.sock")!r}, poller, lambda i, f: None)
        w.bind()
        n_open = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (n_open + 20, hard))
        clients = []
        try:
            while True:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.setblocking(False)
                c.connect_ex({str(tmp_path / "w.sock")!r}); clients.append(c)
        except OSError:
            pass
        accepts, t = 0, time.monotonic()
        while time.monotonic() - t < 1.0:
            for fd, ev in poller.poll(50):
                if fd == w.fd:
                    accepts += 1
                w.on_event(fd, ev)
            w.tick(time.monotonic())
        print("listener events in 1 s:", accepts)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    events = int(out.stdout.rsplit(":", 1)[1])
    assert events <= 10, out.stdout

"""A model host that misbehaves towards the agent (agent/runtime.py): it runs model code, which
may close the host's stdout (its channel to the agent) and run on. The agent's loop must not wait
on it. Real processes where they can show it, a fake one where a real one cannot be made to."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from mlfleet.agent import runtime as runtime_module
from mlfleet.agent.formats import SCRATCH_PREFIX
from mlfleet.agent.runtime import DeploymentRuntime
from mlfleet.common import messages as m
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(60)


def runtime() -> DeploymentRuntime:
    a = m.NodeAssignment(deployment_id="d1", model_id="m1", sha256="a" * 64, model_bytes=1,
                         task="pass_through", threads_per_allocation=1, target_allocations=1,
                         queue_capacity=10, cache_size_bytes=0, priority="normal")

    def nothing(*_: Any) -> None:
        return None
    return DeploymentRuntime(a, node_id="n1", worker_endpoint="/nonexistent", clock=FakeClock(),
                             reply=nothing, reply_payload=nothing, send_worker=nothing, schedule=nothing)


def scratch_dir(pid: int) -> str:
    """A scratch directory of the host with ``pid``, as the host makes them (agent/formats)."""
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{pid}-")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts: each ended by its pid, and reaped, whatever the test did."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


def start_host(rt: DeploymentRuntime, procs: list[subprocess.Popen[bytes]],
               code: str) -> subprocess.Popen[bytes]:
    """A stand-in model host running ``code``, given to ``rt`` as its host (as _start_host does)."""
    h = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(h)
    assert h.stdout is not None
    os.set_blocking(h.stdout.fileno(), False)
    rt._host = h
    rt.core.host_up = True
    return h


def wait_readable(h: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Until the host's pipe has something for the agent: here, its end (EOF)."""
    readable, _, _ = select.select([h.stdout], [], [], timeout_s)
    assert readable, "the host's pipe did not close in time"


def test_a_host_that_closes_its_pipe_and_runs_on_is_killed_without_blocking_the_agent(
        procs: list[subprocess.Popen[bytes]]) -> None:
    rt = runtime()
    changes: list[int] = []
    rt.on_host_change = lambda: changes.append(1)
    h = start_host(rt, procs, "import os, time; os.close(1); time.sleep(8)")
    scratch = scratch_dir(h.pid)
    wait_readable(h)
    rt.on_host_readable()  # it used to wait here for the host to end (8 s)
    assert h.wait(10) == -signal.SIGKILL  # killed: it broke the pipe protocol
    rt.tick()   # a host killed but not yet reaped is reaped on a later event
    assert not os.path.exists(scratch)
    assert changes == [1] and not rt.core.host_up
    assert "killed by SIGKILL" in rt.core.reason
    assert rt.host_fd() is None and rt.host_pid() is None


def test_a_host_that_exits_is_reaped_with_its_code(procs: list[subprocess.Popen[bytes]]) -> None:
    rt = runtime()
    h = start_host(rt, procs, "import sys; sys.exit(3)")
    scratch = scratch_dir(h.pid)
    wait_readable(h)
    rt.on_host_readable()
    assert h.returncode == 3 and not os.path.exists(scratch)
    assert "exited with code 3" in rt.core.reason and not rt.core.host_up


def test_a_host_that_closes_its_pipe_as_it_exits_is_not_killed(procs: list[subprocess.Popen[bytes]],
                                                                caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A host's pipe closes as it exits, a moment before the exit: every normal stop. It gets
    that moment; nothing is killed and nothing is warned about."""
    monkeypatch.setattr(runtime_module, "EXIT_WAIT_S", 30.0)  # that moment, however loaded the machine
    rt = runtime()
    h = start_host(rt, procs, "import os, time; os.close(1); time.sleep(0.05)")
    wait_readable(h)
    rt.on_host_readable()
    assert h.returncode == 0  # it exited by itself
    assert "killing it" not in caplog.text


class SlowToDie:
    """A host that SIGKILL does not end at once (a process in uninterruptible sleep, or one
    tearing down a large address space), with its stdout closed: a real one cannot be made to
    take its time on cue. It is gone when ``gone`` is set."""

    def __init__(self) -> None:
        r, w = os.pipe()
        os.close(w)
        self.stdout = os.fdopen(r, "rb", buffering=0)
        self.stdin = None
        self.pid = (1 << 22) + 4242   # past the kernel's largest pid: no real host's scratch dirs
        self.killed = False
        self.gone = False

    def poll(self) -> Optional[int]:
        return -signal.SIGKILL if self.gone else None

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self.gone:
            raise subprocess.TimeoutExpired("host", timeout or 0.0)
        return -signal.SIGKILL


def test_a_killed_host_slow_to_die_is_reaped_on_a_later_event() -> None:
    rt = runtime()
    h = SlowToDie()
    rt._host = h  # type: ignore[assignment]
    rt.core.host_up = True
    scratch = scratch_dir(h.pid)
    try:
        rt.on_host_readable()
        assert h.killed and not rt.core.host_up and "killed by SIGKILL" in rt.core.reason
        assert os.path.exists(scratch)   # its scratch dirs go once it is gone
        assert rt.host_pid() is None     # no worker of it is taken for this deployment's any more
        rt.begin_stop(False)
        assert rt.phase.value == "stopped"
        assert not rt.reapable()         # its host is not reaped yet
        rt.tick()
        assert os.path.exists(scratch) and not rt.reapable()
        h.gone = True
        rt.tick()
        assert not os.path.exists(scratch) and rt.reapable()
    finally:
        h.stdout.close()
        if os.path.exists(scratch):
            os.rmdir(scratch)

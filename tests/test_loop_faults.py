"""No exception escapes a daemon's loop: a fault in a handler, a waiter or a timer answers its own
request with a 500 (logged with its traceback) and the daemon goes on serving. The coordinator
runs in-process here, with its real socket, so faults can be planted in it."""

from __future__ import annotations

import threading

import pytest

from mlfleet.common import messages as m
from mlfleet.common.errors import ServerError
from mlfleet.coordinator.config import CoordinatorConfig
from mlfleet.coordinator.server import Coordinator
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def coordinator(tmp_path):
    box: list[Coordinator] = []
    bound = threading.Event()

    def run() -> None:  # built on the thread that runs it: its SQLite connection stays there
        coord = Coordinator(CoordinatorConfig(listen="tcp://127.0.0.1:0", data_dir=str(tmp_path / "c")))
        coord.bind()
        box.append(coord)
        bound.set()
        coord.run()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert bound.wait(20)
    coord = box[0]
    try:
        yield coord
    finally:
        coord.stop()
        t.join(10)
        assert not t.is_alive()


def _client(coord):
    from mlfleet import Client
    return Client(coord.endpoint, request_timeout="10s")


def test_a_failing_handler_answers_500_and_the_loop_goes_on(coordinator):
    def broken(ctx, msg):
        raise KeyError("planted")
    coordinator.handlers["get_nodes"] = (m.Empty, broken)
    with _client(coordinator) as c:
        with pytest.raises(ServerError) as e:
            c.get_nodes()
        assert e.value.status == 500 and "KeyError" in e.value.reason
        assert c.get_models()["count"] == 0  # still serving


def test_a_failing_waiter_answers_its_own_request_only(coordinator):
    def park(ctx, msg):
        def check():
            raise RuntimeError("planted in a waiter")
        return coordinator._park(ctx, 5.0, check, lambda: (200, {}))
    coordinator.handlers["get_nodes"] = (m.Empty, park)
    with _client(coordinator) as c:
        with pytest.raises(ServerError) as e:
            c.get_nodes()
        assert "RuntimeError" in e.value.reason
        assert c.get_models()["count"] == 0
    assert coordinator.waiters == []


def test_a_waiter_that_changes_state_does_not_recurse(coordinator):
    """A check that itself settles state (as a failed start begins a stop) asks for another
    round instead of recursing."""
    calls = []

    def park(ctx, msg):
        def check():
            calls.append(1)
            coordinator._settle()  # re-entrant: must not recurse into this check
            return (200, {"ok": len(calls)}) if len(calls) >= 2 else None
        return coordinator._park(ctx, 5.0, check, lambda: (408, {}))
    coordinator.handlers["get_nodes"] = (m.Empty, park)
    with _client(coordinator) as c:
        assert c.get_nodes()["ok"] >= 2
        assert c.get_models()["count"] == 0
    assert coordinator.loop_errors == 0


def test_a_failing_timer_is_counted_and_the_loop_goes_on(coordinator):
    fired = []

    def boom():
        fired.append(1)
        raise ValueError("planted in a timer")
    coordinator.timers.every(0.01, boom)
    wait_until(lambda: len(fired) >= 3, 10, what="the timer to fire and fail a few times")
    with _client(coordinator) as c:
        assert c.get_models()["count"] == 0
    assert coordinator.timers.errors >= 3

"""Offload: blocking work runs on a pool thread and its callback on the caller's loop."""

from __future__ import annotations

import threading

import pytest

from mlfleet.common.offload import Offload

pytestmark = pytest.mark.timeout(30)


def test_callbacks_run_on_the_loop_thread_with_results_and_errors():
    off = Offload(2)
    seen = []
    try:
        off.submit(lambda a, b: (a + b, threading.get_ident()), 2, 3,
                   done=lambda r, e: seen.append((r, e, threading.get_ident())))
        off.submit(lambda: 1 / 0, done=lambda r, e: seen.append((r, type(e), threading.get_ident())))
        assert off.wait_idle(10)
    finally:
        off.close()
    me = threading.get_ident()
    ok = next(s for s in seen if s[1] is None)
    assert ok[0][0] == 5 and ok[0][1] != me and ok[2] == me
    bad = next(s for s in seen if s[1] is not None)
    assert bad[0] is None and bad[1] is ZeroDivisionError and bad[2] == me


def test_a_failing_callback_does_not_stop_the_others():
    off = Offload(1)
    seen = []
    try:
        off.submit(lambda: 1, done=lambda r, e: 1 / 0)
        off.submit(lambda: 2, done=lambda r, e: seen.append(r))
        assert off.wait_idle(10)
    finally:
        off.close()
    assert seen == [2]

"""A closed Client: nothing it does afterwards touches file descriptors it no longer owns, and a
call on it fails at once, saying why (not after its timeout)."""

from __future__ import annotations

import os
import time

import pytest

from mlfleet.common.client import Client, NoAnswer


def _pipe_writing_to(n: int) -> tuple[int, int]:
    """A pipe whose write end is fd ``n`` (free now), as the next file opened in the process
    could get it; returns (read end, n)."""
    with pytest.raises(OSError):
        os.fstat(n)  # the client gave it back
    r, w = os.pipe()
    os.dup2(w, n)
    os.close(w)
    return r, n


def test_a_late_wake_after_close_does_not_write_into_a_reused_fd():
    c = Client("tcp://127.0.0.1:9", request_timeout="1s")
    wake_w = c._io.wake_w
    c.close()
    r, w = _pipe_writing_to(wake_w)
    try:
        os.set_blocking(r, False)
        c._io.forget(1, "tcp://127.0.0.1:9")  # what a thread still using the client does
        with pytest.raises(BlockingIOError):
            os.read(r, 16)  # nothing was written into the pipe that now has that number
    finally:
        os.close(r)
        os.close(w)


def test_a_call_on_a_closed_client_fails_at_once():
    c = Client("tcp://127.0.0.1:9", request_timeout="30s")
    c.close()
    with pytest.raises(NoAnswer, match="the client is closed"):  # not "no answer ... within 30s"
        c.get_nodes()


def test_inference_on_a_closed_client_fails_at_once_even_with_a_routing_table():
    from mlfleet.common.client import Routes
    c = Client("tcp://127.0.0.1:9", request_timeout="30s")
    c._routing["d"] = Routes({"routes": [{"address": "tcp://127.0.0.1:9", "current_allocations": 1,
                                          "routing_state": "started"}],
                              "version": 1}, time.monotonic())
    c.close()
    with pytest.raises(NoAnswer, match="the client is closed"):
        c.infer("d", [{"input": [1.0]}], timeout="20s")

"""An allocation worker: forked from its model host, it shares the host's weights copy-on-write
and runs forward passes for the jobs its agent sends it, one message at a time.

Protocol with the agent (DEALER -> the agent's worker ROUTER, msgpack maps):
    worker -> agent  {"op": "ready", "pid"}                                    once connected
    agent  -> worker {"op": "infer", "jobs": [{"rid", "docs"}, ...]}         one job, or a batch
    worker -> agent  {"op": "results", "time_ms", "items": [{"rid", "results"} | {"rid", "status", "reason"}]}
    agent  -> worker {"op": "stop"}
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import zmq

from mlfleet.common.errors import ApiError
from mlfleet.common.proc import set_parent_death_signal
from mlfleet.common.protocol import pack, unpack


def run_jobs(task: Any, jobs: list[dict]) -> list[dict]:
    """All documents of all jobs go through the task together; outcomes are split back per job.
    A job with any failed document is answered with the first error (its status and reason).
    If the batch as a whole fails (one document broke the forward pass of all), each job is
    run again on its own, so a bad document fails its own request only."""
    docs, bounds = [], []
    for job in jobs:
        d = job.get("docs") or []
        bounds.append((len(docs), len(docs) + len(d)))
        docs.extend(d)
    try:
        outcomes = task.run(docs)
    except Exception as e:  # a bug or a broken model must not end the worker
        if len(jobs) > 1:
            return [item for job in jobs for item in run_jobs(task, [job])]
        err = e if isinstance(e, ApiError) else ApiError(f"inference failed: {type(e).__name__}: {e}"[:1000])
        outcomes = [err] * len(docs)
    items = []
    for job, (a, b) in zip(jobs, bounds, strict=True):
        mine = outcomes[a:b]
        err = next((o for o in mine if isinstance(o, ApiError)), None)
        if err is not None:
            items.append({"rid": job.get("rid"), "status": err.status, "reason": err.reason})
        else:
            items.append({"rid": job.get("rid"), "results": mine})
    return items


def worker_main(task: Any, *, endpoint: str, identity: bytes, threads: int,
                low_priority: bool, parent_pid: int) -> int:
    """Runs in the forked child; returns the exit code."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the host died between fork and prctl
        return 1
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if low_priority:
        os.nice(15)  # as Elasticsearch's pytorch_inference does for priority=low
    from mlfleet.agent.formats import warm_up  # warm allocations: warm-up passes before "ready"
    with torch.inference_mode():  # as requests run; a failure raises and the worker exits
        warm_up(task)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    sock.send(pack({"op": "ready", "pid": os.getpid()}))
    try:
        with torch.inference_mode():
            while True:
                msg = unpack(sock.recv())
                op = msg.get("op")
                if op == "stop":
                    return 0
                if op != "infer":
                    continue
                t0 = time.perf_counter()
                items = run_jobs(task, msg.get("jobs") or [])
                sock.send(pack({"op": "results", "items": items,
                                "time_ms": (time.perf_counter() - t0) * 1000}))
    finally:
        sock.close(linger=1000)
        ctx.term()

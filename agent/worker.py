"""An allocation worker: forked from its model host, it shares the host's weights copy-on-write
and runs forward passes for the jobs its agent sends it, one message at a time.

Protocol with the agent (an AF_UNIX stream to the agent's worker socket, messages framed by
common/stream.py; common/protocol.py's envelope, the bodies common/messages.py types):
    worker -> agent  its identity (one frame: deployment|node|worker id)   first
    worker -> agent  ready   WorkerReady                                    once connected
    agent  -> worker infer   RunJobs, then each job's payload frames        one job, or a batch
    worker -> agent  results Results, then each 200 result's payload frames
    agent  -> worker stop
A job's payload is the client's request payload as it came (the agent never decodes it): the
worker decodes the documents here, arrays straight on the frames' buffers, and encodes each
job's results as the payload the agent sends back to the client as it is.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

import torch

from mlfleet.common import messages as m
from mlfleet.common import stream
from mlfleet.common.errors import ApiError, BadRequest
from mlfleet.common.proc import set_parent_death_signal
from mlfleet.common.protocol import (
    PAYLOAD_LIMITS,
    Buffer,
    decode_payload,
    decode_request,
    encode_payload,
    encode_request,
)


def decode_jobs(header: Any, payload: list[Buffer]) -> list[dict]:
    """``infer``'s header and payload frames -> ``[{"rid", "docs"} | {"rid", "error"}]``. A job
    whose documents do not decode or break a rule fails alone, with the rule it broke."""
    msg = m.decode_run_jobs(header.body)
    jobs, at = [], 0
    for j in msg.jobs:
        frames = payload[at:at + j["frames"]]
        at += j["frames"]
        try:
            if len(frames) != j["frames"]:
                raise BadRequest("malformed message: fewer payload frames than the job declares")
            tree = decode_payload(frames, PAYLOAD_LIMITS)
            docs = m.decode_docs(tree)
            jobs.append({"rid": j["rid"], "docs": docs, "config": j.get("inference_config")})
        except ApiError as e:
            jobs.append({"rid": j["rid"], "error": e})
    return jobs


def encode_results(items: list[dict], time_ms: float) -> list[Any]:
    """``run_jobs``' items -> the ``results`` message: its header, then each answered job's
    results as a payload (large arrays in frames of their own, by reference: no copy)."""
    heads: list[dict[str, Any]] = []
    frames: list[Any] = [b""]
    for item in items:
        if "results" in item:
            try:
                payload = encode_payload(item["results"])
            except (TypeError, ValueError, OverflowError) as e:
                heads.append({"rid": item["rid"], "status": 500,
                              "reason": f"the results cannot be encoded: {type(e).__name__}: {e}"[:1000]})
                continue
            heads.append({"rid": item["rid"], "status": 200, "docs": len(item["results"]),
                          "frames": len(payload)})
            frames.extend(payload)
        else:
            heads.append({"rid": item["rid"], "status": item["status"], "reason": item["reason"][:4000]})
    frames[0] = encode_request("results", 0, {"time_ms": time_ms, "items": heads})
    return frames


def run_jobs(task: Any, jobs: list[dict]) -> list[dict]:
    """All documents of all jobs go through the task together; outcomes are split back per job.
    A job with any failed document is answered with the first error (its status and reason).
    If the batch as a whole fails (one document broke the forward pass of all), each job is
    run again on its own, so a bad document fails its own request only."""
    failed = [{"rid": j["rid"], "status": j["error"].status, "reason": j["error"].reason}
              for j in jobs if "error" in j]
    if failed:
        return failed + run_jobs(task, [j for j in jobs if "error" not in j])
    if not jobs:
        return []
    docs, bounds, overrides = [], [], []
    for job in jobs:
        d = job.get("docs") or []
        bounds.append((len(docs), len(docs) + len(d)))
        docs.extend(d)
        overrides.extend([job.get("config")] * len(d))
    try:
        # a request's inference_config applies to each of its documents (the task checks it)
        outcomes = task.run(docs, overrides) if any(o is not None for o in overrides) else task.run(docs)
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(endpoint)
    reader = stream.Reader(sock)
    stream.send_blocking(sock, [identity])
    stream.send_blocking(sock, [encode_request("ready", 0, {"pid": os.getpid()})])
    inbox: list[list[memoryview]] = []
    try:
        with torch.inference_mode():
            while True:
                while not inbox:
                    inbox = reader.read()  # blocking; EOFError when the agent is gone
                frames = inbox.pop(0)
                try:
                    header = decode_request(frames[0])
                except ApiError as e:
                    print(f"worker: ignoring a malformed message: {e.reason}", file=sys.stderr)
                    continue
                if header.op == "stop":
                    return 0
                if header.op != "infer":
                    continue
                t0 = time.perf_counter()
                try:
                    jobs = decode_jobs(header, frames[1:])
                except ApiError as e:
                    print(f"worker: ignoring a malformed job list: {e.reason}", file=sys.stderr)
                    continue
                items = run_jobs(task, jobs)
                stream.send_blocking(sock, encode_results(items, (time.perf_counter() - t0) * 1000))
    except (EOFError, ConnectionError):
        return 0  # the agent closed our stream: nothing to answer to
    finally:
        sock.close()

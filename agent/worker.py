"""An allocation worker: forked from its model host, it shares the host's weights copy-on-write
and runs forward passes for the requests its agent sends it, one at a time.

Protocol with the agent (DEALER -> the agent's worker ROUTER, msgpack maps):
    worker -> agent  {"op": "ready", "pid"}                         once connected
    agent  -> worker {"op": "infer", "rid", "docs"}
    worker -> agent  {"op": "result", "rid", "results", "time_ms"} | {"op": "error", "rid", "status", "reason"}
    agent  -> worker {"op": "stop"}
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import torch
import zmq

from common.errors import ApiError, BadRequest
from common.proc import set_parent_death_signal
from common.protocol import decode_array, encode_array, is_array, pack, unpack


def _tensor(obj: Any, where: str) -> torch.Tensor:
    if not is_array(obj):
        raise BadRequest(f"[{where}] must be an array {{dtype, shape, data}}")
    arr = decode_array(obj, where)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _output(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return encode_array(out.detach().cpu().numpy())
    if isinstance(out, (list, tuple)):
        return [_output(o) for o in out]
    if isinstance(out, dict):
        return {str(k): _output(v) for k, v in out.items()}
    if isinstance(out, (int, float, bool, str)) or out is None:
        return out
    return encode_array(np.asarray(out))


class PassThrough:
    """Task ``pass_through``: ``{"input": array}`` or ``{"inputs": [array, ...]}`` -> model output."""

    def __init__(self, model: torch.jit.ScriptModule) -> None:
        self.model = model

    def __call__(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise BadRequest("each doc must be a map with [input] or [inputs]")
        if "input" in doc:
            args = [_tensor(doc["input"], "input")]
        elif "inputs" in doc and isinstance(doc["inputs"], list):
            args = [_tensor(x, f"inputs.{i}") for i, x in enumerate(doc["inputs"])]
        else:
            raise BadRequest("each doc must carry [input] (an array) or [inputs] (a list of arrays)")
        try:
            out = self.model(*args)
        except Exception as e:  # the model's own complaint about shape or dtype
            raise BadRequest(f"the model rejected the input: {str(e).strip().splitlines()[-1][:500]}") from None
        return {"predicted_value": _output(out)}


def worker_main(model: torch.jit.ScriptModule, *, endpoint: str, identity: bytes, threads: int,
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
    task = PassThrough(model)
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
                rid = msg.get("rid")
                t0 = time.perf_counter()
                try:
                    results = [task(doc) for doc in msg.get("docs", [])]
                    reply = {"op": "result", "rid": rid, "results": results,
                             "time_ms": (time.perf_counter() - t0) * 1000}
                except ApiError as e:
                    reply = {"op": "error", "rid": rid, "status": e.status, "reason": e.reason}
                except Exception as e:
                    reply = {"op": "error", "rid": rid, "status": 500,
                             "reason": f"inference failed: {type(e).__name__}: {e}"[:1000]}
                sock.send(pack(reply))
    finally:
        sock.close(linger=1000)
        ctx.term()

"""What the agent's per-deployment core (``agent/core.py``) asks its shell (``agent/runtime.py``)
to do: one frozen dataclass per command, returned in order from every event method. They carry
no behaviour beyond saying what is to be done; the shell carries them out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Union

from mlfleet.common import messages as m

Payload = tuple[Any, ...]  # frames, opaque to the core: a request's documents or a job's results


class Timer(str, enum.Enum):
    TICK = "tick"     # deadlines, reconcile, restart backoff, host kill
    BATCH = "batch"   # a batch's delay is over: hand out work
    LOAD = "load"     # a load retry's backoff is over: start the host again


# ---- commands out ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartHost:
    model_path: str
    tokenizer_path: Optional[str]
    attempt: int


@dataclass(frozen=True)
class HostCommand:
    """A message for the model host: spawn, kill or exit (see agent/host.py)."""
    cmd: str
    worker_id: str = ""
    identity: str = ""
    force: bool = False

    def message(self) -> tuple[str, dict[str, Any]]:
        """(op, body) as the pipe carries it: Spawn, KillWorker, or ``exit`` with no body."""
        if self.cmd == "spawn":
            return "spawn", m.encode(m.Spawn(worker_id=self.worker_id, identity=self.identity))
        if self.cmd == "kill":
            return "kill", m.encode(m.KillWorker(worker_id=self.worker_id, force=self.force))
        return self.cmd, {}


@dataclass(frozen=True)
class KillHost:
    """The host did not exit in time after ``exit``: SIGKILL it (its workers die with it)."""


@dataclass(frozen=True)
class SendWorker:
    """Jobs for a worker: ``(job id, payload, inference_config)``, the payloads as the clients
    sent them."""
    identity: bytes
    jobs: tuple[tuple[int, Payload, Optional[dict[str, Any]]], ...]


@dataclass(frozen=True)
class StopWorker:
    identity: bytes


@dataclass(frozen=True)
class Reply:
    client: bytes
    rid: int
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class ReplyPayload:
    """A 200 answer whose results are a payload a worker encoded (or the cache kept): sent as it is."""
    client: bytes
    rid: int
    payload: Payload


@dataclass(frozen=True)
class Schedule:
    at: float
    timer: Timer


@dataclass(frozen=True)
class Observe:
    """One request's queue and compute time, for the metrics histograms."""
    queue_s: float
    compute_s: float


@dataclass(frozen=True)
class Log:
    level: str   # "info" | "warning"
    message: str


Command = Union[StartHost, HostCommand, KillHost, SendWorker, StopWorker, Reply, ReplyPayload, Schedule,
                Observe, Log]

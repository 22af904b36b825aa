"""The agent's typed configuration, read once and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str
    node_id: str
    listen: str = "tcp://127.0.0.1:0"
    advertise: Optional[str] = None
    allocated_processors: Optional[int] = None
    data_dir: Optional[str] = None
    ready_file: Optional[str] = None
    worker_restart_budget: int = 3         # restarts allowed per window before a route is failed
    worker_restart_window_s: float = 60.0
    stop_grace_s: float = 5.0              # a stopped deployment's running requests get this long
    overrun_grace_s: float = 5.0           # a forward pass this far past its deadline is cut off
    queue_max_bytes: int = 256 << 20       # bytes of requests held per deployment (429 past it)
    load_retries: int = 2                  # a model that fails to load is tried this many more times
    load_timeout_s: float = 600.0          # a model host that has not loaded by then is killed (a try)
    require_sandbox: bool = False          # refuse to start where Landlock or seccomp is missing
    curve_secret_key: Optional[str] = None        # CURVE for the coordinator link and inference
    coordinator_public_key: Optional[str] = None
    metrics_listen: Optional[str] = None          # [HOST:]PORT for Prometheus (loopback by default)
    metrics_tls_cert: Optional[str] = None        # TLS for the metrics endpoint (required off loopback)
    metrics_tls_key: Optional[str] = None
    metrics_basic_auth: Optional[str] = None      # file of "user:password" lines (required off loopback)

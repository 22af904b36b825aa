"""The coordinator's typed configuration, read once and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_COORDINATOR = "tcp://127.0.0.1:7600"


@dataclass(frozen=True)
class CoordinatorConfig:
    listen: str = DEFAULT_COORDINATOR
    data_dir: str = "./mlfleet-data/coordinator"
    ready_file: Optional[str] = None
    heartbeat_interval_s: float = 1.0
    node_timeout_s: float = 10.0
    adaptive_interval_s: float = 10.0
    scale_up_cooldown_s: float = 300.0
    scale_to_zero_after_s: float = 900.0
    stop_timeout_s: float = 30.0
    warm_zero_keep_s: float = 300.0
    # model bytes sent to agents, all together (0: no cap), as Elasticsearch paces shard
    # recoveries (indices.recovery.max_bytes_per_sec): liveness before transfer speed
    bulk_max_bytes_per_sec: int = 0
    curve_secret_key: Optional[str] = None   # CURVE on every address when set
    authorized_keys: Optional[str] = None    # lines "ROLE Z85_PUBLIC_KEY"
    metrics_listen: Optional[str] = None     # [HOST:]PORT for Prometheus (loopback unless a host is given)
    metrics_tls_cert: Optional[str] = None   # TLS for the metrics endpoint (required off loopback)
    metrics_tls_key: Optional[str] = None
    metrics_basic_auth: Optional[str] = None  # file of "user:password" lines (required off loopback)

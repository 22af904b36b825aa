"""Prometheus metrics for both daemons (prometheus-client: the exposition format, HTTP server and
histograms are its job, not ours).

The daemons are single-threaded event loops; the HTTP server runs in its own thread. So the loop
publishes a snapshot (a list of metric families, swapped in whole, which is atomic) once a
second, and the collector only reads the latest snapshot: no lock, no race with the loop.
Histograms are observed from the loop directly (prometheus-client's are thread-safe).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import ssl
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Any, Optional
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Snapshot:
    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.snapshot = Snapshot()
        self.registry.register(self.snapshot)
        self.queue_seconds = Histogram(
            "mlfleet_inference_queue_seconds", "Time a request waited in the node's queue.",
            ["deployment", "node"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram(
            "mlfleet_inference_compute_seconds", "Forward-pass time per request (cache misses).",
            ["deployment", "node"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.url: Optional[str] = None
        self._server = None

    def serve(self, listen: str, *, tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
              basic_auth: Optional[str] = None) -> str:
        """Serve /metrics on ``listen`` (``PORT`` or ``HOST:PORT``; the host defaults to loopback).
        Off loopback it needs TLS (``tls_cert`` + ``tls_key``) and basic auth (a file of lines
        ``user:password``, private to its owner), or it refuses (ValueError)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not _is_loopback(host) and not (tls_cert and tls_key and basic_auth):
            raise ValueError(f"refusing to serve metrics on {host} without TLS and basic auth: off "
                             "loopback pass --metrics-tls-cert, --metrics-tls-key and "
                             "--metrics-basic-auth")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--metrics-tls-cert and --metrics-tls-key go together")
        app = make_wsgi_app(self.registry)
        if basic_auth:
            app = _with_basic_auth(app, _load_credentials(basic_auth))
        server = make_server(host, int(port), app, ThreadingWSGIServer, handler_class=_SilentHandler)
        if tls_cert and tls_key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(certfile=tls_cert, keyfile=tls_key)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name="mlfleet-metrics", daemon=True).start()
        self._server = server
        scheme = "https" if tls_cert else "http"
        self.url = f"{scheme}://{host}:{server.server_port}/metrics"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def publish(self, families: list[Metric]) -> None:
        self.snapshot.families = families


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_credentials(path: str) -> list[tuple[str, str]]:
    """``user:password`` lines; the file must be private to its owner (like a secret key)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"basic auth file {path} is accessible to group or others (mode "
                         f"{stat.S_IMODE(mode):04o}); chmod 600 {path}")
    creds = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"{path}:{n}: expected 'user:password'")
            creds.append((user, password))
    if not creds:
        raise ValueError(f"{path} holds no 'user:password' line")
    return creds


def _with_basic_auth(app: Callable[..., Any], creds: list[tuple[str, str]]) -> Callable[..., Any]:
    expected = [b"Basic " + base64.b64encode(f"{u}:{p}".encode()) for u, p in creds]

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not any(hmac.compare_digest(given, e) for e in expected):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="mlfleet metrics"'),
                                                ("Content-Type", "text/plain")])
            return [b"unauthorized\n"]
        return app(environ, start_response)
    return guarded


def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)

"""Prometheus metrics for both daemons (prometheus-client: the exposition format, HTTP server and
histograms are its job, not ours).

The daemons are single-threaded event loops; the HTTP server runs in its own thread. So the loop
publishes a snapshot (a list of metric families, swapped in whole, which is atomic) once a
second, and the collector only reads the latest snapshot: no lock, no race with the loop.
Histograms are observed from the loop directly (prometheus-client's are thread-safe).
"""

from __future__ import annotations

from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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

    def serve(self, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._server = server
        self.url = f"http://{host or '127.0.0.1'}:{server.server_port}/metrics"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def publish(self, families: list[Metric]) -> None:
        self.snapshot.families = families


def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)

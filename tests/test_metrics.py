"""Prometheus endpoints on the coordinator and the agent, scraped over HTTP."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest

from tests.helpers import Cluster, Mlp, save_model, wait_until

pytestmark = pytest.mark.timeout(120)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_endpoints(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(extra=["--metrics-listen", "127.0.0.1:0"])
        c.start_agent("node-a", 2, extra=["--metrics-listen", "127.0.0.1:0"])
        c.wait_nodes(1)
        coord_url = json.loads((tmp_path / "coordinator.ready.json").read_text())["metrics"]
        agent_url = json.loads((tmp_path / "node-a.ready.json").read_text())["metrics"]
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", number_of_allocations=2, wait_for="fully_allocated", cache_size="0b")
            for i in range(20):
                client.infer("mlp", [{"input": np.full((1, 8), i, np.float32)}])
        def agent_ready():
            t = scrape(agent_url)
            return t if (value(t, "mlfleet_inference_requests_total", deployment="mlp") or 0) >= 20 else None
        text = wait_until(agent_ready, 10, what="agent counters")
        assert value(text, "mlfleet_allocations", deployment="mlp", kind="target") == 2
        assert value(text, "mlfleet_inference_compute_seconds_count", deployment="mlp") == 20
        assert value(text, "mlfleet_inference_queue_seconds_count", deployment="mlp") == 20
        assert re.search(r'mlfleet_inference_compute_seconds_bucket\{.*le="0\.01".*\} \d', text)
        assert value(text, "mlfleet_coordinator_connected", node="node-a") == 1
        def coord_ready():
            t = scrape(coord_url)
            return t if value(t, "mlfleet_deployment_inference_count", deployment="mlp") == 20 else None
        ctext = wait_until(coord_ready, 10, what="coordinator gauges")
        assert value(ctext, "mlfleet_node_up", node="node-a") == 1
        assert value(ctext, "mlfleet_deployment_allocations", deployment="mlp", kind="current") == 2
    finally:
        assert not c.shutdown()

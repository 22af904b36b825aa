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
            client.start_deployment("mlp", number_of_allocations=2, wait_for="fully_allocated",
                                    cache_size="0b")
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


def test_metrics_bind_loopback_by_default_and_refuse_other_interfaces_without_tls_and_auth(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(extra=["--metrics-listen", "0"])  # a port alone: loopback
        url = json.loads((tmp_path / "coordinator.ready.json").read_text())["metrics"]
        assert url.startswith("http://127.0.0.1:")
        assert "mlfleet_node_up" in scrape(url) or "# HELP" in scrape(url)
    finally:
        c.shutdown()
    import subprocess
    import sys

    from tests.helpers import ROOT
    p = subprocess.run([sys.executable, "-m", "mlfleet", "coordinator", "--listen", "tcp://127.0.0.1:0",
                        "--data-dir", str(tmp_path / "c2"), "--metrics-listen", "0.0.0.0:0"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "without TLS and basic auth" in p.stderr


def test_metrics_over_tls_with_basic_auth(tmp_path):
    import base64
    import os
    import ssl
    import subprocess
    import urllib.error
    cert, key = tmp_path / "m.crt", tmp_path / "m.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    auth = tmp_path / "metrics.auth"
    auth.write_text("prometheus:s3cret\n")
    os.chmod(auth, 0o600)
    c = Cluster(tmp_path)
    try:
        c.start_coordinator(extra=["--metrics-listen", "127.0.0.1:0", "--metrics-tls-cert", str(cert),
                                   "--metrics-tls-key", str(key), "--metrics-basic-auth", str(auth)])
        url = json.loads((tmp_path / "coordinator.ready.json").read_text())["metrics"]
        assert url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))

        def get(credentials: str | None) -> tuple[int, str]:
            req = urllib.request.Request(url)
            if credentials:
                req.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""
        assert get(None)[0] == 401
        assert get("prometheus:wrong")[0] == 401
        assert get("prometheus:s3cret")[0] == 200
        wait_until(lambda: "mlfleet_waiting_requests" in get("prometheus:s3cret")[1], 10,
                   what="the first published snapshot")
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not served
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=5)
    finally:
        c.shutdown()

"""The admin CLI against a live coordinator, output parsed as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(180)


def mlfleet(cluster, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "mlfleet", *args, "--coordinator",
                        cluster.coordinator.endpoint, "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=90)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_cli_end_to_end(cluster2, mlp_path):
    put = json.loads(mlfleet(cluster2, "models", "put", "cli-mlp", "--file", str(mlp_path)).stdout)
    assert put["model_id"] == "cli-mlp" and put["task"] == "pass_through" and len(put["sha256"]) == 64
    listed = json.loads(mlfleet(cluster2, "models", "list").stdout)
    assert "cli-mlp" in [m["model_id"] for m in listed["trained_model_configs"]]

    started = json.loads(mlfleet(cluster2, "deployments", "start", "cli-mlp", "--number-of-allocations",
                                 "2", "--wait-for", "fully_allocated").stdout)
    assert sum(r["current_allocations"] for r in started["assignment"]["routing_table"].values()) == 2

    out = json.loads(mlfleet(cluster2, "infer", "cli-mlp", "--docs",
                             json.dumps([{"input": [[0.1] * 8]}, {"input": [[0.2] * 8, [0.3] * 8]}])).stdout)
    res = out["inference_results"]
    assert len(res) == 2 and len(res[0]["predicted_value"]) == 1 and len(res[1]["predicted_value"]) == 2
    assert all(isinstance(v, float) for v in res[1]["predicted_value"][0])

    stats = json.loads(mlfleet(cluster2, "deployments", "stats", "cli-mlp").stdout)
    assert stats["count"] == 1
    assert stats["trained_model_stats"][0]["deployment_stats"]["allocation_status"]["allocation_count"] == 2
    nodes = json.loads(mlfleet(cluster2, "nodes", "list").stdout)
    assert set(nodes["nodes"]) == {"node-a", "node-b"}

    # errors: empty stdout, the error body on stderr's last line, non-zero exit
    bad = mlfleet(cluster2, "deployments", "start", "cli-mlp", "--deployment-id", "x2",
                  "--threads-per-allocation", "3", ok=False)
    assert bad.returncode == 1 and bad.stdout == ""
    err = json.loads(bad.stderr.strip().splitlines()[-1])
    assert err["status"] == 400 and "[threads_per_allocation] must be a power of 2" in err["error"]["reason"]
    missing = mlfleet(cluster2, "deployments", "stop", "nope", "--no-allow-no-match", ok=False)
    assert json.loads(missing.stderr.strip().splitlines()[-1])["status"] == 404

    # tables for people: --format table (the default on a terminal)
    table = subprocess.run([sys.executable, "-m", "mlfleet", "deployments", "stats", "cli-mlp",
                            "--coordinator", cluster2.coordinator.endpoint, "--format", "table"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "Deployments" in table.stdout and "cli-mlp" in table.stdout and "allocations" in table.stdout
    nodes_table = subprocess.run([sys.executable, "-m", "mlfleet", "nodes", "list", "--coordinator",
                                  cluster2.coordinator.endpoint, "--format", "table"],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "node-a" in nodes_table.stdout and "processors" in nodes_table.stdout

    shown = subprocess.run([sys.executable, "-m", "mlfleet", "deployments", "start", "cli-mlp",
                            "--deployment-id", "cli-table", "--coordinator", cluster2.coordinator.endpoint,
                            "--format", "table"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "Deployment cli-table: started" in shown.stdout
    assert json.loads(mlfleet(cluster2, "deployments", "stop", "cli-table").stdout) == {"stopped": True}

    assert json.loads(mlfleet(cluster2, "deployments", "stop", "cli-mlp").stdout) == {"stopped": True}
    assert json.loads(mlfleet(cluster2, "models", "delete", "cli-mlp").stdout) == {"acknowledged": True}


def test_cli_without_coordinator_fails_fast_with_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mlfleet", "nodes", "list", "--coordinator",
                        "tcp://127.0.0.1:1", "--format", "json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=90, env={**__import__("os").environ})
    assert p.returncode == 3 and p.stdout == ""
    error = json.loads(p.stderr.strip().splitlines()[-1])["error"]
    assert "no answer from tcp://127.0.0.1:1" in error["reason"]


def test_models_put_takes_a_warm_up_input_from_a_npy_file(cluster2, mlp_path, tmp_path):
    import numpy as np
    ex = tmp_path / "example.npy"
    np.save(ex, np.full((1, 8), 0.5, np.float32))
    mlfleet(cluster2, "models", "put", "cli-warm", "--file", str(mlp_path), "--example-input", str(ex))
    got = json.loads(mlfleet(cluster2, "models", "get", "cli-warm").stdout)
    stored = got["trained_model_configs"][0]["inference_config"]["pass_through"]
    assert stored["example_input"]["shape"] == [1, 8] and stored["example_input"]["dtype"] == "<f4"
    bad = tmp_path / "not-an-array.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    p = mlfleet(cluster2, "models", "put", "cli-bad", "--file", str(mlp_path), "--example-input", str(bad),
                ok=False)
    assert p.returncode == 2 and "--example-input" in p.stderr and "is not a .npy array" in p.stderr
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    p = mlfleet(cluster2, "models", "put", "cli-bad", "--file", str(mlp_path),
                "--example-input", str(pickled), ok=False)
    assert p.returncode == 2 and "is not a .npy array" in p.stderr


def test_the_coordinator_refuses_a_node_timeout_not_past_the_heartbeat_interval(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mlfleet", "coordinator", "--data-dir", str(tmp_path / "c"),
                        "--listen", "tcp://127.0.0.1:0", "--heartbeat-interval", "2s",
                        "--node-timeout", "1s"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    said = " ".join(p.stderr.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # rich's box, any width
    assert p.returncode == 2 and "--node-timeout: must be longer than --heartbeat-interval" in said

"""A client in a second language (Node.js, clients/node/infer.mjs), written from docs/protocol.md
alone, runs an inference against a real cluster and gets what the Python client gets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, Cluster, Mlp, save_model

pytestmark = pytest.mark.timeout(180)

CLIENT_DIR = ROOT / "clients" / "node"
INFER = CLIENT_DIR / "infer.mjs"
NPM_INSTALL_TIMEOUT_S = 120


def _deps_load(node: str) -> bool:
    """The packages are there and zeromq's prebuilt native addon loads on this machine."""
    probe = "await import('zeromq'); await import('@msgpack/msgpack');"
    r = subprocess.run([node, "--input-type=module", "-e", probe], cwd=CLIENT_DIR,
                       capture_output=True, timeout=60)
    return r.returncode == 0


def node_client() -> list[str]:
    """The command that runs the Node client, installing its locked dependencies if they are
    missing (zeromq ships prebuilt binaries, so no compiler is needed); skips when that fails."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js (`node`) is not installed: the Node.js client cannot run")
    if not (CLIENT_DIR / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("clients/node/node_modules is missing and `npm` is not installed")
        try:
            r = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                               cwd=CLIENT_DIR, capture_output=True, text=True,
                               timeout=NPM_INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`npm ci` in clients/node took over {NPM_INSTALL_TIMEOUT_S}s")
        if r.returncode != 0:
            pytest.skip(f"`npm ci` in clients/node failed: {r.stderr.strip()[-500:]}")
    if not _deps_load(node):
        pytest.skip("clients/node dependencies (zeromq, @msgpack/msgpack) do not load; "
                    "run `npm ci` in clients/node")
    return [node, str(INFER)]


def run_client(cmd: list[str], endpoint: str, deployment_id: str, docs: list) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, endpoint, deployment_id, json.dumps(docs)], capture_output=True,
                          text=True, timeout=60)


def test_node_client_infers_like_the_python_client(tmp_path: Path):
    cmd = node_client()
    c = Cluster(tmp_path)
    try:
        coordinator = c.start_coordinator()
        c.start_agent("node-a", 2)
        c.wait_nodes(1)
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", deployment_id="mlp-node", wait_for="started")
            x = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]
            expected = client.infer("mlp-node", [{"input": np.asarray(x, np.float32)}])
            want = expected["inference_results"][0]["predicted_value"]

            r = run_client(cmd, coordinator.endpoint, "mlp-node", [{"input": x}])
            assert r.returncode == 0, f"node client failed: {r.stderr}"
            out = json.loads(r.stdout)
            assert list(out) == ["inference_results"] and len(out["inference_results"]) == 1
            got = np.asarray(out["inference_results"][0]["predicted_value"], np.float32)
            assert got.shape == want.shape == (1, 4)
            assert np.allclose(got, want), (got, want)

            # An error reply from the agent (the model rejects a (1, 3) input): body on stderr, exit 1.
            r = run_client(cmd, coordinator.endpoint, "mlp-node", [{"input": [[1.0, 2.0, 3.0]]}])
            assert r.returncode == 1 and r.stdout == ""
            err = json.loads(r.stderr)
            assert err["status"] == 400 and err["error"]["type"] == "status_exception", err

            # An error reply from the coordinator (unknown deployment).
            r = run_client(cmd, coordinator.endpoint, "no-such-dep", [{"input": x}])
            assert r.returncode == 1
            err = json.loads(r.stderr)
            assert err["status"] == 404 and err["error"]["type"] == "resource_not_found_exception", err
    finally:
        assert c.shutdown() == []

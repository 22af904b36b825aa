"""`mlfleet up` runs the HTTP gateway beside its coordinator and agent, and stops it with them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import pytest

from tests.gateway_support import Http
from tests.helpers import ROOT, wait_until

pytestmark = pytest.mark.timeout(120)


def test_up_serves_the_http_gateway(tmp_path, mlp_path):
    ready = tmp_path / "up.json"
    proc = subprocess.Popen([sys.executable, "-m", "mlfleet", "up", "--data-dir", str(tmp_path / "data"),
                             "--listen", "tcp://127.0.0.1:0", "--gateway-listen", "http://127.0.0.1:0",
                             "--allocated-processors", "2", "--ready-file", str(ready)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        info = wait_until(lambda: ready.exists() and json.loads(ready.read_text()), 90, what="up to be ready")
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert info["gateway"].startswith("http://127.0.0.1:")
        h = Http(info["gateway"])
        try:
            from mlfleet.common.client import Client
            with Client(info["endpoint"]) as c:
                c.put_model("m", mlp_path)
            status, _, body = h.call("POST", "/_ml/trained_models/m/deployment/_start")
            assert status == 200, body
            status, _, out = h.call("POST", "/_ml/trained_models/m/_infer",
                                    {"docs": [{"input": [[1.0] * 8]}]})
            assert status == 200 and len(out["inference_results"][0]["predicted_value"][0]) == 4
        finally:
            h.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        left = [pid for pid in children if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        for pid in left:
            psutil.Process(pid).kill()
        assert not left, f"outlived mlfleet up: {left}"
        assert code == 0


def test_up_runs_without_the_gateway_when_its_port_is_taken(tmp_path):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ready = tmp_path / "up.json"
    proc = subprocess.Popen([sys.executable, "-m", "mlfleet", "up", "--data-dir", str(tmp_path / "data"),
                             "--listen", "tcp://127.0.0.1:0", "--gateway-listen", f"http://127.0.0.1:{port}",
                             "--allocated-processors", "1", "--ready-file", str(ready)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        info = wait_until(lambda: ready.exists() and json.loads(ready.read_text()), 90, what="up to be ready")
        assert "gateway" not in info and info["agent"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
        taken.close()
    assert proc.returncode == 0, err
    assert "running without the HTTP gateway" in err

"""An agent that leaves (SIGTERM) while its deployments take a while to stop stays gone: it sends
no heartbeat after its leave, so the coordinator does not take it back (it answered such a
heartbeat with "reregister", the agent registered again, and work was planned back onto a node
that was exiting, lost only at --node-timeout)."""

from __future__ import annotations

import signal
import threading

import numpy as np
import psutil
import pytest
import torch

from tests.helpers import running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(120)


class Slow(torch.nn.Module):
    """Seconds of matrix products for one request: its stop waits for it (--stop-grace)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(512) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(3000):
            y = torch.tanh(y @ self.w)
        return y


def test_a_leaving_agent_does_not_register_again(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2}, agent_extra=["--stop-grace", "4s"]) as c, \
            c.client(request_timeout="30s") as client:
        client.put_model("slow", save_model(Slow(), tmp_path / "slow.pt"))
        client.start_deployment("slow", cache_size="0b", wait_for="fully_allocated")
        agent = c.agents["node-a"]
        before = {p.pid: p.cpu_times().user for p in psutil.Process(agent.pid).children(recursive=True)}
        t = threading.Thread(target=lambda: _infer_quietly(client), daemon=True)
        t.start()

        def busy() -> bool:  # a worker is running the request: its CPU time grows
            for p in psutil.Process(agent.pid).children(recursive=True):
                try:
                    if p.cpu_times().user - before.get(p.pid, p.cpu_times().user) > 0.3:
                        return True
                except psutil.NoSuchProcess:
                    pass
            return False
        wait_until(busy, 30, what="the request to run")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        assert "node-a" not in client.get_nodes()["nodes"]  # it left, and stayed gone
        log = c.coordinator.log.read_text()
        assert "node [node-a] is leaving the cluster" in log
        assert "node [node-a] re-registered" not in log
        t.join(30)


def _infer_quietly(client) -> None:
    try:
        client.infer("slow", [{"input": np.ones((64, 512), np.float32)}], timeout="20s")
    except Exception:  # the node leaves under it: whatever it answers is not what is tested
        pass

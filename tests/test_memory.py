"""One copy of the weights per node, measured with psutil on real processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.formats_support import big_in_three_formats
from tests.helpers import Cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(240)
MB = 1 << 20


class Big(torch.nn.Module):
    """64 MB of float32 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2048, 2048) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def deployment_memory(agent_pid: int) -> dict[str, int]:
    procs = psutil.Process(agent_pid).children(recursive=True)
    infos = {p.pid: (p.ppid() == agent_pid, p.memory_full_info()) for p in procs}
    return {"processes": len(infos),
            "uss": sum(mi.uss for _, mi in infos.values()),
            "pss": sum(mi.pss for _, mi in infos.values()),
            "max_worker_uss": max((mi.uss for host, mi in infos.values() if not host), default=0)}


def test_workers_share_one_copy_of_the_weights(tmp_path: Path):
    assert_one_copy_per_node(tmp_path, save_model(Big(), tmp_path / "big.pt"))


@pytest.fixture(scope="session")
def big_formats(tmp_path_factory):
    return big_in_three_formats(tmp_path_factory)


@pytest.mark.parametrize("fmt", ["export", "aoti"])
def test_every_format_keeps_one_copy_of_the_weights(tmp_path: Path, big_formats, fmt):
    """The exported program and the AOTInductor package are loaded once, in the model host, and
    shared copy-on-write by its workers like TorchScript (the AOTI library's weights are in its
    mapped .so, and stay shared after the host empties its scratch directory)."""
    assert_one_copy_per_node(tmp_path, big_formats[fmt], fmt)


def assert_one_copy_per_node(tmp_path: Path, model: Path, fmt: str = "torchscript") -> None:
    c = Cluster(tmp_path)
    try:
        c.start_coordinator()
        agent = c.start_agent("node-a", 4)
        c.wait_nodes(1)
        model_bytes = model.stat().st_size
        assert model_bytes > 60 * MB
        with c.client() as client:
            client.put_model("big", model)
            conf = client.get_models("big")["trained_model_configs"][0]
            assert conf["inference_config"]["pass_through"]["format"] == fmt
            client.start_deployment("big", wait_for="fully_allocated", cache_size="0b")
            x = np.ones((1, 2048), np.float32)
            for _ in range(5):
                client.infer("big", [{"input": x}])
            one = deployment_memory(agent.pid)
            assert one["processes"] == 2  # the model host and one worker

            client.update_deployment("big", number_of_allocations=4)
            wait_until(lambda: client.get_stats("big")["trained_model_stats"][0]["deployment_stats"]
                       ["allocation_status"]["allocation_count"] == 4, 30, what="4 allocations")
            for _ in range(40):  # every worker runs forward passes over the shared weights
                client.infer("big", [{"input": x + np.float32(np.random.rand())}])
            four = deployment_memory(agent.pid)
            assert four["processes"] == 5

        runtime_footprint = 64 * MB  # generous: a forked worker's own pages are a few MB
        assert four["uss"] < model_bytes + 4 * runtime_footprint, four
        assert four["max_worker_uss"] < model_bytes / 2, "a worker holds a private copy of the weights"
        growth = four["pss"] - one["pss"]
        assert growth < model_bytes, f"1 -> 4 allocations grew PSS by {growth / MB:.0f} MB"
    finally:
        assert not c.shutdown()


def test_no_shared_memory_segments_are_left_behind(tmp_path: Path):
    """Weights are shared copy-on-write from the model host (fork), not through /dev/shm: stopping
    a deployment or killing an agent leaves no segment to clean up."""
    before = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").exists() else set()
    c = Cluster(tmp_path)
    try:
        c.start_coordinator()
        agent = c.start_agent("node-a", 2)
        c.wait_nodes(1)
        with c.client() as client:
            client.put_model("big", save_model(Big(), tmp_path / "big.pt"))
            client.start_deployment("big", number_of_allocations=2, wait_for="fully_allocated")
            client.infer("big", [{"input": np.ones((1, 2048), np.float32)}])
            pids = [p.pid for p in agent.children()]
            agent.stop(sig=9)  # SIGKILL: the host and workers must not outlive their agent
            wait_until(lambda: not any(psutil.pid_exists(p)
                                       and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                       for p in pids), 10, what="host and workers to die with the agent")
    finally:
        assert not c.shutdown()
    after = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").exists() else set()
    assert after <= before

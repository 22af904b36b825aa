"""Uploaded models run sandboxed: a TorchScript model that reads a host file or writes one fails
inside the model, its worker keeps serving, nothing leaks. (Sockets and programs need native
code: tests/test_sandbox.py runs an AOTInductor library that tries them under the same sandbox.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfleet.agent import sandbox
from mlfleet.common.errors import ApiError
from tests.helpers import Mlp, running_cluster, save_model

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not (sandbox.probe()["landlock_abi"] and sandbox.probe()["seccomp_filter"]),
                                 reason="this kernel lacks Landlock or seccomp filters")]


class ReadsHostFile(torch.nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=4, dtype=torch.uint8)
        return x + data[0].to(torch.float32)


class WritesHostFile(torch.nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
        t.fill_(65)
        return x + t[0].to(torch.float32)  # used, so no optimizer drops the write


def test_models_cannot_read_or_write_host_files(tmp_path):
    secret = tmp_path / "secret.key"
    secret.write_text("hunter2\n")
    target = tmp_path / "planted"
    with (running_cluster(tmp_path, {"node-a": 2}, agent_extra=["--require-sandbox"]) as c,
          c.client() as client):
        # unsandboxed, both models do what they say
        assert torch.jit.script(ReadsHostFile(str(secret)))(torch.zeros(1)).item() == ord("h")
        probe = tmp_path / "probe"
        assert torch.jit.script(WritesHostFile(str(probe)))(torch.zeros(1)).item() == 65
        assert probe.read_bytes() == b"A" * 8
        client.put_model("reader", save_model(ReadsHostFile("/etc/hostname"), tmp_path / "r.pt"))
        client.put_model("key-reader", save_model(ReadsHostFile(str(secret)), tmp_path / "k.pt"))
        client.put_model("writer", save_model(WritesHostFile(str(target)), tmp_path / "w.pt"))
        client.put_model("mlp", save_model(Mlp(), tmp_path / "m.pt"))
        x = [{"input": np.zeros(1, np.float32)}]
        for model in ("reader", "key-reader", "writer"):
            client.start_deployment(model, wait_for="started", cache_size="0b")
            pids = set(c.worker_pids("node-a"))
            with pytest.raises(ApiError) as e:
                client.infer(model, x)
            assert e.value.status in (400, 500) and ("Permission denied" in e.value.reason
                                                     or "errno 13" in e.value.reason.lower()), e.value
            with pytest.raises(ApiError):  # the same worker answers again, the same way
                client.infer(model, x)
            assert set(c.worker_pids("node-a")) == pids
            client.stop_deployment(model)
        assert not target.exists()
        client.start_deployment("mlp", wait_for="started")
        assert client.infer("mlp", [{"input": np.ones((1, 8), np.float32)}])["inference_results"]
        client.stop_deployment("mlp")
    log = (tmp_path / "node-a.log").read_text()
    assert "models run sandboxed" in log

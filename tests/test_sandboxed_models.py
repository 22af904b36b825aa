"""Uploaded models run sandboxed, in every format: a TorchScript model or an exported program that
reads a host file or writes one fails inside the model, its worker keeps serving, nothing leaks;
an AOTInductor package's native code can neither open files, connect nor run programs
(tests/test_sandbox.py shows the same library doing all four unsandboxed)."""

from __future__ import annotations

import errno
import socket

import numpy as np
import pytest
import torch

from mlfleet.agent import sandbox
from mlfleet.common.errors import ApiError
from tests import hostile
from tests.formats_support import hostile_native
from tests.helpers import Mlp, running_cluster, save_model, wait_until

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
            # its processor is free again once its processes are gone (a loaded machine is slow)
            wait_until(lambda: not c.worker_pids("node-a"), 30, what="the stopped deployment's processes")
        assert not target.exists()
        client.start_deployment("mlp", wait_for="started")
        assert client.infer("mlp", [{"input": np.ones((1, 8), np.float32)}])["inference_results"]
        client.stop_deployment("mlp")
    log = (tmp_path / "node-a.log").read_text()
    assert "models run sandboxed" in log


def test_exported_programs_cannot_read_or_write_host_files(tmp_path):
    """A torch.export program runs ATen ops, and aten.from_file maps any file: the sandbox
    stops it as it stops TorchScript (loading one needs a scratch directory: the only place
    the host may write, emptied once loaded)."""
    secret = tmp_path / "secret.key"
    secret.write_text("hunter2\n")
    target = tmp_path / "planted"
    reader = hostile.exported_from_file(tmp_path / "r.pt2", str(secret), write=False)
    writer = hostile.exported_from_file(tmp_path / "w.pt2", str(target), write=True)
    assert torch.export.load(reader).module()(torch.zeros(1)).item() == ord("h")  # unsandboxed
    with (running_cluster(tmp_path, {"node-a": 2}, agent_extra=["--require-sandbox"]) as c,
          c.client() as client):
        for name, path in (("reader", reader), ("writer", writer)):
            client.put_model(name, path)
            assert client.get_models(name)["trained_model_configs"][0]["inference_config"][
                "pass_through"]["format"] == "export"
            client.start_deployment(name, wait_for="started", cache_size="0b", timeout="90s")
            with pytest.raises(ApiError) as e:
                client.infer(name, [{"input": np.zeros(1, np.float32)}])
            assert "Permission denied" in e.value.reason or "errno 13" in e.value.reason.lower(), e.value
            client.stop_deployment(name)
            # its processor is free again once its processes are gone (a loaded machine is slow)
            wait_until(lambda: not c.worker_pids("node-a"), 30, what="the stopped deployment's processes")
    assert not target.exists()


def test_an_aoti_package_deployed_cannot_read_write_connect_or_exec(tmp_path, tmp_path_factory):
    """tests/hostile.py's native library, uploaded and deployed like any model: inside the model
    host's worker its open, socket and spawn calls fail (tests/test_sandbox.py shows they work
    unsandboxed)."""
    pkg, target = hostile_native(tmp_path_factory)
    for leftover in ("written", "marker"):
        (target / leftover).unlink(missing_ok=True)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        with (running_cluster(tmp_path, {"node-a": 2}, agent_extra=["--require-sandbox"]) as c,
              c.client() as client):
            client.put_model("native", pkg)
            assert client.get_models("native")["trained_model_configs"][0]["inference_config"][
                "pass_through"]["format"] == "aoti"
            client.start_deployment("native", wait_for="started", cache_size="0b", timeout="90s")
            got = {}
            for name, mode in (("read", hostile.READ), ("write", hostile.WRITE),
                               ("connect", hostile.CONNECT), ("exec", hostile.EXEC)):
                doc = {"input": np.array([mode, port], np.int64)}
                res = client.infer("native", [doc])["inference_results"][0]["predicted_value"]
                got[name] = int(res[0])
            assert got == {"read": errno.EACCES, "write": errno.EACCES,  # Landlock
                           "connect": errno.EPERM, "exec": errno.EPERM}, got  # seccomp
            try:
                conn, _ = listener.accept()
                conn.close()
                accepted = True
            except BlockingIOError:
                accepted = False
            assert not accepted
    finally:
        listener.close()
    assert not (target / "written").exists() and not (target / "marker").exists()

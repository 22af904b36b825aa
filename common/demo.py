"""The demo behind `make demo`: the embedded default (`mlfleet up`) with a real TorchScript model
deployed on 2 allocations, a few hundred inferences through the Python client, the deployment's
stats, then a clean shutdown that leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch


class DemoNet(torch.nn.Module):
    """A small classifier: 32 features -> 10 class probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)


def main() -> int:
    from common.client import Client
    work = Path(tempfile.mkdtemp(prefix="mlfleet-demo-"))
    torch.manual_seed(0)
    model_path = work / "demo-net.pt"
    torch.jit.save(torch.jit.script(DemoNet().eval()), str(model_path))
    ready = work / "up.json"
    up = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--data-dir", str(work / "data"),
                           "--listen", "tcp://127.0.0.1:0", "--ready-file", str(ready)])
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if up.poll() is not None or time.monotonic() > deadline:
                print("mlfleet up did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        endpoint = json.loads(ready.read_text())["endpoint"]
        with Client(endpoint) as client:
            print(f"\n== put model: {client.put_model('demo-net', model_path)}")
            t0 = time.monotonic()
            body = client.start_deployment("demo-net", number_of_allocations=2, wait_for="started",
                                           timeout="60s")
            print(f"== started in {time.monotonic() - t0:.2f}s: "
                  f"{json.dumps(body['assignment']['routing_table'])}")
            descendants = {p.pid for p in psutil.Process(up.pid).children(recursive=True)}
            rng = np.random.default_rng(0)
            n, t0 = 300, time.monotonic()
            lat = []
            for _ in range(n):
                x = rng.standard_normal((4, 32)).astype(np.float32)
                t = time.perf_counter()
                out = client.infer("demo-net", [{"input": x}])
                lat.append((time.perf_counter() - t) * 1000)
                probs = out["inference_results"][0]["predicted_value"]
                assert probs.shape == (4, 10) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
            took = time.monotonic() - t0
            lat.sort()
            print(f"== {n} inferences in {took:.2f}s ({n / took:.0f}/s), "
                  f"p50 {lat[n // 2]:.2f} ms, p99 {lat[int(n * 0.99)]:.2f} ms")
            time.sleep(1.0)  # one heartbeat, so the stats include the last requests
            stats = client.get_stats("demo-net")["trained_model_stats"][0]["deployment_stats"]
            print("== deployment stats:")
            print(json.dumps(stats, indent=2))
            print(f"== stop: {client.stop_deployment('demo-net')}")
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    left = [pid for pid in descendants if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    print(f"== mlfleet up exited with {up.returncode}; processes left behind: {left or 'none'}")
    return 0 if up.returncode == 0 and not left else 1


if __name__ == "__main__":
    sys.exit(main())

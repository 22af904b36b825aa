"""Stopping under load: with finish_pending_work every queued request is served; without it,
queued requests get a clear 409 and running ones finish. Nothing hangs."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from mlfleet.common.errors import ApiError, TooManyRequests
from tests.helpers import Slow, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("stopcluster")) as c:
        with c.client() as client:
            client.put_model("slow", save_model(Slow(), c.workdir / "slow.pt"))
        yield c


def _pending(client, dep: str) -> int:
    nodes = client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]["nodes"]
    return sum(n["number_of_pending_requests"] for n in nodes)


def test_stop_with_finish_pending_work_serves_every_queued_request(slow_cluster):
    with slow_cluster.client() as client:
        client.start_deployment("slow", deployment_id="drain", wait_for="fully_allocated")
        xs = [np.array([0.3 + i / 100], np.float32) for i in range(4)]
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client.infer, "drain", [{"input": x}], "30s") for x in xs]
            wait_until(lambda: _pending(client, "drain") == 4, 15, what="4 requests pending")
            assert client.stop_deployment("drain", finish_pending_work=True) == {"stopped": True}
            results = [f.result(30) for f in futs]
        assert all(np.allclose(r["inference_results"][0]["predicted_value"], x)
                   for r, x in zip(results, xs, strict=True))
        wait_until(lambda: slow_cluster.worker_pids("node-a") == [], 20, what="workers gone")


def test_stop_without_finish_pending_work_answers_queued_requests(slow_cluster):
    with slow_cluster.client() as client:
        client.start_deployment("slow", deployment_id="cut", wait_for="fully_allocated")
        xs = [np.array([0.5 + i / 100], np.float32) for i in range(4)]
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(client.infer, "cut", [{"input": x}], "30s") for x in xs]
            wait_until(lambda: _pending(client, "cut") == 4, 15, what="4 requests pending")
            assert client.stop_deployment("cut") == {"stopped": True}
            outcomes = []
            for f in futs:
                try:
                    f.result(30)
                    outcomes.append(200)
                except ApiError as e:
                    outcomes.append(e.status)
        assert outcomes.count(200) >= 1          # the running request finished
        # the queued ones were told (409 while it stops, 404 once it is gone); none hung
        assert set(outcomes) <= {200, 404, 409}
        assert len([o for o in outcomes if o != 200]) >= 1


def test_full_queue_is_429_with_a_retry_hint(slow_cluster):
    """The first request runs long and the second waits behind it, so the states the test waits
    for hold until it has sent the third: no race with a request finishing early."""
    with slow_cluster.client() as client:
        client.start_deployment("slow", deployment_id="tight", queue_capacity=1, wait_for="fully_allocated",
                                cache_size="0b")
        try:
            with cf.ThreadPoolExecutor(2) as pool:
                first = pool.submit(client.infer, "tight", [{"input": np.array([30.0], np.float32)}], "60s")
                wait_until(lambda: _pending(client, "tight") == 1, 15, what="one running")
                second = pool.submit(client.infer, "tight", [{"input": np.array([0.01], np.float32)}], "60s")
                wait_until(lambda: _pending(client, "tight") == 2, 15, what="one queued")
                with pytest.raises(TooManyRequests) as e:
                    client.infer("tight", [{"input": np.array([0.02], np.float32)}])
                assert e.value.type == "es_rejected_execution_exception"
                assert isinstance(e.value.retry_after_ms, int) and e.value.retry_after_ms > 0
                stats = wait_until(lambda: (s := client.get_stats("tight")["trained_model_stats"][0]
                                            ["deployment_stats"])["rejected_execution_count"] == 1 and s,
                                   10, what="the rejection counted")
                assert stats["nodes"][0]["number_of_pending_requests"] == 2
                client.stop_deployment("tight")  # the running one is cut at the stop grace
                for f in (first, second):
                    with pytest.raises(ApiError):
                        f.result(30)
        finally:
            client.stop_deployment("tight")

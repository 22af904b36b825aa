"""Nothing takes a daemon down: failing models, overrunning forward passes, stops of busy
deployments, bad documents in a batch, memory bounded in bytes, low priority kept at one
allocation. Real daemons on loopback, real workers, real models built here."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch

from mlfleet.common.errors import ApiError, BadRequest, RequestTimeout, ServerError, TooManyRequests
from tests.helpers import Mlp, Slow, broken_torchscript, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(240)

AGENT = ["--overrun-grace", "1s", "--stop-grace", "2s", "--queue-max-bytes", "1mb"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("robust"), {"node-a": 2}, agent_extra=AGENT) as c:
        with c.client() as client:
            client.put_model("slow", save_model(Slow(), c.workdir / "slow.pt"))
            client.put_model("mlp", save_model(Mlp(), c.workdir / "mlp.pt"))
            client.put_model("broken", broken_torchscript(c.workdir / "broken.pt"))
        yield c


def _pending(client, dep: str) -> int:
    nodes = client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]["nodes"]
    return sum(n["number_of_pending_requests"] for n in nodes)


def _pids(cluster) -> set[int]:
    return set(cluster.worker_pids("node-a"))


def test_a_model_that_fails_to_load_fails_the_start_and_the_coordinator_lives(cluster):
    coord = psutil.Process(cluster.coordinator.pid)
    with cluster.client() as client:
        with pytest.raises(ServerError) as e:
            client.start_deployment("broken", wait_for="started", timeout="60s")
        assert e.value.status == 500
        assert e.value.reason.startswith("Could not start trained model deployment, the following "
                                         "nodes failed with errors [node-a: ")
        assert "could not load model" in e.value.reason
        assert "3 attempts" in e.value.reason  # load retries are bounded
        assert coord.is_running() and cluster.coordinator.proc.poll() is None
        assert client.stop_deployment("broken") == {"stopped": True}
        wait_until(lambda: client.get_stats()["trained_model_stats"] == [] or all(
            e["deployment_stats"]["deployment_id"] != "broken"
            for e in client.get_stats()["trained_model_stats"]), 20, what="the failed deployment gone")
        wait_until(lambda: _pids(cluster) == set(), 20, what="no model host left")
        # the coordinator still serves everything else
        client.start_deployment("mlp", deployment_id="after-broken", wait_for="started")
        out = client.infer("after-broken", [{"input": np.ones((1, 8), np.float32)}])
        assert out["inference_results"][0]["predicted_value"].shape == (1, 4)
        client.stop_deployment("after-broken")


def test_a_failed_route_without_a_waiter_stays_failed_with_its_reason_and_can_be_stopped(cluster):
    with cluster.client() as client:
        client.start_deployment("broken", deployment_id="broken-nowait", wait_for="starting")
        state = wait_until(lambda: (d := client.get_stats("broken-nowait")["trained_model_stats"][0]
                                    ["deployment_stats"])["state"] == "failed" and d, 60,
                           what="the deployment failed")
        route = state["nodes"][0]["routing_state"]
        assert route["routing_state"] == "failed" and "could not load model" in route["reason"]
        assert client.stop_deployment("broken-nowait") == {"stopped": True}
        wait_until(lambda: _pids(cluster) == set(), 20, what="no model host left")


def test_a_forward_pass_past_its_deadline_has_its_worker_replaced(cluster):
    with cluster.client() as client:
        client.start_deployment("slow", deployment_id="overrun", wait_for="fully_allocated",
                                cache_size="0b")
        try:
            before = _pids(cluster)
            with pytest.raises(RequestTimeout):  # at its deadline, not after the model's 60 s
                client.infer("overrun", [{"input": np.array([60.0], np.float32)}], timeout="1s")
            # killed at its deadline plus the grace (1s), replaced by a fork of the warm host
            out = client.infer("overrun", [{"input": np.array([0.01], np.float32)}], timeout="10s")
            assert np.allclose(out["inference_results"][0]["predicted_value"], [0.01])
            after = _pids(cluster)
            assert len(after) == len(before) and after != before  # same host, a new worker
            wait_until(lambda: client.get_stats("overrun")["trained_model_stats"][0]["deployment_stats"]
                       ["timeout_count"] == 1, 10, what="the timeout counted (stats come with heartbeats)")
        finally:
            client.stop_deployment("overrun")
        wait_until(lambda: _pids(cluster) == set(), 20, what="processes gone")


def test_stop_ends_a_busy_deployment_within_its_grace(cluster):
    with cluster.client() as client:
        client.start_deployment("slow", deployment_id="busy", wait_for="fully_allocated", cache_size="0b")
        with cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.infer, "busy", [{"input": np.array([120.0], np.float32)}], "300s")
            wait_until(lambda: _pending(client, "busy") == 1, 20, what="the request running")
            pids = _pids(cluster)
            assert len(pids) == 2
            t0 = time.monotonic()
            assert client.stop_deployment("busy") == {"stopped": True}
            assert time.monotonic() - t0 < 15  # the agent's stop grace is 2s; SIGKILL after it
            with pytest.raises(ApiError) as e:
                running.result(30)
            assert e.value.status in (409, 500)
        wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                   for p in pids), 20, what="the host and its worker gone")


def test_a_document_torch_cannot_take_fails_its_own_request_only(cluster):
    with cluster.client() as client:
        client.start_deployment("mlp", deployment_id="isolate", max_batch_size=8, max_batch_delay="200ms",
                                cache_size="0b", wait_for="fully_allocated")
        try:
            good = [[{"input": np.full((1, 8), i, np.float32)}] for i in range(6)]
            bad = [[{"input": np.array(["x"] * 8)}],
                   [{"input": np.array(["2020-01-01"] * 8, dtype="datetime64[D]")}]]
            requests = good[:3] + bad + good[3:]
            out = client.infer_many("isolate", requests, inflight=8)
            errors = [o for o in out if isinstance(o, ApiError)]
            assert len(errors) == 2 and all(e.status == 400 for e in errors), out
            assert all(isinstance(o, dict) for i, o in enumerate(out) if i not in (3, 4))
            stats = wait_until(lambda: (d := client.get_stats("isolate")["trained_model_stats"][0]
                                        ["deployment_stats"])["inference_count"] == 6 and d, 10,
                               what="the six served requests counted")
            assert stats["nodes"][0]["average_batch_size"] > 1  # they did share batches
        finally:
            client.stop_deployment("isolate")


def test_queued_bytes_have_a_budget(cluster):
    with cluster.client() as client:
        client.start_deployment("slow", deployment_id="bytes", wait_for="fully_allocated", cache_size="0b")
        big = np.zeros(180_000, np.float32)  # 720 KB, runs at once (x[0] = 0)
        try:
            with cf.ThreadPoolExecutor(2) as pool:  # the first runs long: the states below hold
                running = pool.submit(client.infer, "bytes", [{"input": np.array([60.0], np.float32)}], "90s")
                wait_until(lambda: _pending(client, "bytes") == 1, 20, what="one running")
                queued = pool.submit(client.infer, "bytes", [{"input": big}], "90s")
                wait_until(lambda: _pending(client, "bytes") == 2, 20, what="one queued")
                with pytest.raises(TooManyRequests) as e:
                    client.infer("bytes", [{"input": big + 1}], timeout="30s")
                assert "bytes" in e.value.reason and e.value.retry_after_ms is not None
                client.stop_deployment("bytes")  # the running one is cut at the stop grace
                for f in (running, queued):
                    with pytest.raises(ApiError):
                        f.result(30)
        finally:
            client.stop_deployment("bytes")


def test_low_priority_stays_one_allocation_of_one_thread(cluster):
    with cluster.client() as client:
        with pytest.raises(BadRequest) as e:
            client.start_deployment("mlp", deployment_id="low-adaptive", priority="low",
                                    adaptive_allocations={"enabled": True, "max_number_of_allocations": 4})
        assert "[max_number_of_allocations] must be 1 when [priority] is low" in e.value.reason
        client.start_deployment("mlp", deployment_id="low", priority="low", wait_for="started")
        try:
            with pytest.raises(BadRequest) as e:
                client.update_deployment("low", number_of_allocations=2)
            assert "[number_of_allocations] must be 1 when [priority] is low" in e.value.reason
            with pytest.raises(BadRequest) as e:
                client.update_deployment("low", adaptive_allocations={"enabled": True,
                                                                      "min_number_of_allocations": 2,
                                                                      "max_number_of_allocations": 2})
            assert "when [priority] is low" in e.value.reason
            # adaptive between 0 and 1 is fine for low priority
            body = client.update_deployment("low", adaptive_allocations={"enabled": True,
                                                                         "min_number_of_allocations": 0,
                                                                         "max_number_of_allocations": 1})
            assert body["assignment"]["task_parameters"]["number_of_allocations"] == 1
        finally:
            client.stop_deployment("low")


def test_bad_numbers_are_400_and_the_coordinator_keeps_serving(cluster):
    with cluster.client() as client:
        for kw in ({"max_batch_delay": float("nan")}, {"max_batch_delay": float("inf")},
                   {"timeout": float("nan")}, {"timeout": -1.0}):
            with pytest.raises(ApiError) as e:
                client.start_deployment("mlp", deployment_id="nan", **kw)
            assert e.value.status == 400, kw
        assert cluster.coordinator.proc.poll() is None
        assert client.get_nodes()["nodes"]


class Heavy(torch.nn.Module):
    """Mlp's answers with 256 MB of weights beside them: a fetch of many chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp()
        self.register_buffer("ballast", torch.zeros(64 << 20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.ballast[0]


def test_a_fetch_survives_a_coordinator_outage_and_restart(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2}) as c:
        endpoint = c.coordinator.endpoint
        with c.client(request_timeout="120s") as client:
            client.put_model("heavy", save_model(Heavy(), tmp_path / "heavy.pt"))
            client.start_deployment("heavy", wait_for="starting", timeout="60s")
            # freeze the coordinator as soon as the agent has begun the 256 MB fetch, then kill
            # it and start it again on the same address and data
            models = tmp_path / "agent-node-a" / "models"
            wait_until(lambda: list(models.glob("*.part")), 30, 0.002, what="the fetch to begin")
            os.kill(c.coordinator.pid, signal.SIGSTOP)
            mid_fetch = list(models.glob("*.part")) and not [p for p in models.iterdir()
                                                             if not p.name.endswith(".part")]
            c.coordinator.stop(signal.SIGKILL)
            c.retired.append(c.coordinator)
            c.start_coordinator(listen=endpoint)
            assert c.coordinator.endpoint == endpoint
        with c.client(request_timeout="30s") as client:
            wait_until(lambda: client.get_stats("heavy")["trained_model_stats"][0]["deployment_stats"]
                       ["allocation_status"]["state"] == "fully_allocated", 90,
                       what="the deployment started after the outage")
            out = client.infer("heavy", [{"input": np.ones((1, 8), np.float32)}])
            assert out["inference_results"][0]["predicted_value"].shape == (1, 4)
            client.stop_deployment("heavy")
        assert mid_fetch, "the fetch had finished when the coordinator froze (test premise)"

"""Durability: a coordinator restart loses no model or deployment and restarts no healthy worker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


def test_coordinator_restart_keeps_models_deployments_and_workers(fresh_cluster, mlp_path):
    c = fresh_cluster
    coord = c.start_coordinator()
    c.start_agent("node-a", 2)
    c.wait_nodes(1)
    with c.client() as client:
        client.put_model("mlp", mlp_path)
        client.start_deployment("mlp", number_of_allocations=2, wait_for="fully_allocated")
        x = np.ones((1, 8), np.float32)
        before = client.infer("mlp", [{"input": x}])["inference_results"][0]["predicted_value"]
    workers = sorted(c.worker_pids("node-a"))
    assert len(workers) == 3  # one host, two workers

    endpoint = coord.endpoint
    assert coord.stop() == 0
    c.retired.append(coord)

    # agents keep serving while the coordinator is down (a client with a routing table needs no coordinator)
    c.start_coordinator(listen=endpoint)
    with c.client() as client:
        assert client.get_models("mlp")["count"] == 1
        listed = client.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
        assert listed["deployment_id"] == "mlp" and listed["number_of_allocations"] == 2
        wait_until(lambda: client.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
                   ["allocation_status"]["state"] == "fully_allocated", 30,
                   what="the agent to re-register and report")
        after = client.infer("mlp", [{"input": x}])["inference_results"][0]["predicted_value"]
        np.testing.assert_array_equal(before, after)
    assert sorted(c.worker_pids("node-a")) == workers, "healthy workers were restarted"


def test_client_keeps_inferring_while_coordinator_is_down(fresh_cluster, mlp_path):
    c = fresh_cluster
    coord = c.start_coordinator()
    c.start_agent("node-a", 2)
    c.wait_nodes(1)
    with c.client(routing_ttl="1s", request_timeout="2s") as client:
        client.put_model("mlp", mlp_path)
        client.start_deployment("mlp", wait_for="started")
        x = np.ones((1, 8), np.float32)
        client.infer("mlp", [{"input": x}])  # caches the routing table
        coord.stop()
        stopped = time.monotonic()
        c.retired.append(coord)
        c.coordinator = None
        deadline = stopped + 8  # well past the table's 1 s lifetime and a refresh's 2 s wait
        served = []
        while time.monotonic() < deadline:
            assert client.infer("mlp", [{"input": x}])["inference_results"]
            served.append(time.monotonic())
        # served on, also after the table's lifetime and a failed refresh (1 s + 2 s) had passed
        assert any(t > stopped + 1.0 + 2.0 for t in served), served

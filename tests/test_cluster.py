"""A real coordinator and two agents on loopback, real worker processes, real TorchScript."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mlfleet.common.errors import ApiError, BadRequest, Conflict, NotFound, TooManyRequests
from tests.helpers import TwoInOut, save_model, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def client(cluster2):
    with cluster2.client() as c:
        yield c


@pytest.fixture(scope="module")
def mlp_model(client, mlp_path):
    return client.put_model("mlp", mlp_path)


def test_nodes_report_cpu_memory_and_processors(client):
    nodes = client.get_nodes()["nodes"]
    assert set(nodes) == {"node-a", "node-b"}
    for node_id, n in nodes.items():
        assert n["name"] == node_id
        assert n["allocated_processors"] == 4
        assert n["cpu"]["logical"] >= 1 and n["cpu"]["physical"] >= 1
        assert n["memory"]["total_bytes"] > n["memory"]["available_bytes"] > 0
        assert n["transport_address"].startswith("tcp://127.0.0.1:")
        assert n["deployments"] == []


def test_put_and_get_model(client, mlp_model, mlp_path):
    data = mlp_path.read_bytes()
    assert mlp_model == {"model_id": "mlp", "model_size_bytes": len(data), "task": "pass_through",
                         "sha256": hashlib.sha256(data).hexdigest()}
    got = client.get_models("mlp")
    assert got["count"] == 1 and got["trained_model_configs"][0]["model_id"] == "mlp"
    with pytest.raises(NotFound, match=r"Could not find trained model \[nope\]"):
        client.get_models("nope")
    with pytest.raises(BadRequest, match="already exists"):
        client.put_model("mlp", mlp_path)


def test_six_allocations_spread_over_two_nodes_and_serve_correct_results(cluster2, client, mlp_model,
                                                                         mlp_path):
    body = client.start_deployment("mlp", deployment_id="mlp-six", number_of_allocations=6,
                                   wait_for="fully_allocated", timeout="60s")
    a = body["assignment"]
    assert a["assignment_state"] == "started"
    table = a["routing_table"]
    assert set(table) == {"node-a", "node-b"}
    assert sum(r["current_allocations"] for r in table.values()) == 6
    assert all(r["current_allocations"] <= 4 and r["routing_state"] == "started" for r in table.values())
    assert a["task_parameters"]["model_bytes"] == mlp_model["model_size_bytes"]
    assert a["task_parameters"]["cache_size"] == f'{mlp_model["model_size_bytes"]}b'

    # one model host per node plus one worker process per allocation
    for node_id, r in table.items():
        want = 1 + r["current_allocations"]
        wait_until(lambda node_id=node_id, want=want: len(cluster2.worker_pids(node_id)) == want,
                   20, what=f"processes on {node_id}")

    # every agent fetched the definition from the coordinator and verified it
    for node_id in table:
        cached = cluster2.workdir / f"agent-{node_id}" / "models" / mlp_model["sha256"]
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == mlp_model["sha256"]

    reference = torch.jit.load(str(mlp_path))
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.standard_normal((3, 8)).astype(np.float32)
        out = client.infer("mlp-six", [{"input": x}, {"input": x[:1]}])
        res = out["inference_results"]
        assert len(res) == 2
        expected = reference(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(res[0]["predicted_value"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res[1]["predicted_value"], expected[:1], rtol=1e-5, atol=1e-6)

    stats = wait_until(lambda: (s := client.get_stats("mlp-six"))["trained_model_stats"][0]
                       ["deployment_stats"]["inference_count"] >= 20 and s, 10, what="stats")
    ds = stats["trained_model_stats"][0]["deployment_stats"]
    assert ds["allocation_status"] == {"allocation_count": 6, "target_allocation_count": 6,
                                       "state": "fully_allocated"}
    assert {n["routing_state"]["routing_state"] for n in ds["nodes"]} == {"started"}
    assert sum(n["number_of_allocations"] for n in ds["nodes"]) == 6
    nodes = client.get_nodes()["nodes"]
    assert all("mlp-six" in n["deployments"] for n in nodes.values())

    # stop: routes go, every worker and host process exits
    assert client.stop_deployment("mlp-six") == {"stopped": True}
    for node_id in table:
        wait_until(lambda node_id=node_id: cluster2.worker_pids(node_id) == [], 20,
                   what=f"no workers on {node_id}")
    with pytest.raises(NotFound, match=r"No known model deployment with id \[mlp-six\]"):
        client.get_stats("mlp-six")
    with pytest.raises(NotFound):
        client.infer("mlp-six", [{"input": np.zeros((1, 8), np.float32)}])


def test_model_with_several_inputs_and_outputs(cluster2, client, tmp_path):
    client.put_model("two", save_model(TwoInOut(), tmp_path / "two.pt"))
    client.start_deployment("two", wait_for="started")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.ones((2, 3), np.float32) * 2
    out = client.infer("two", [{"inputs": [x, y]}])["inference_results"][0]["predicted_value"]
    np.testing.assert_array_equal(out[0], x + y)
    np.testing.assert_array_equal(out[1], x * y)
    with pytest.raises(BadRequest, match="the model rejected the input"):
        client.infer("two", [{"inputs": [x]}])
    # the worker survived the bad input
    assert client.infer("two", [{"inputs": [x, y]}])["inference_results"][0]
    assert client.stop_deployment("two") == {"stopped": True}


def test_start_errors_leave_nothing_behind(client, mlp_model):
    with pytest.raises(NotFound, match=r"Could not find trained model \[ghost\]"):
        client.start_deployment("ghost")
    with pytest.raises(TooManyRequests) as e:
        client.start_deployment("mlp", deployment_id="too-big", number_of_allocations=9)
    assert "not enough resources to provide all requested allocations" in e.value.reason
    assert e.value.retry_after_ms is None and e.value.status == 429
    with pytest.raises(TooManyRequests, match="no ML nodes with sufficient capacity"):
        client.start_deployment("mlp", deployment_id="fat", threads_per_allocation=8)
    with pytest.raises(NotFound):
        client.get_stats("too-big")
    with pytest.raises(ApiError) as e:
        client.start_deployment("mlp", number_of_allocations=0, threads_per_allocation=3, queue_capacity=0)
    assert e.value.status == 400 and e.value.type == "action_request_validation_exception"
    assert e.value.reason == (
        "Validation Failed: 1: [number_of_allocations] must be a positive integer;"
        "2: [threads_per_allocation] must be a power of 2 less than or equal to 32;"
        "3: [queue_capacity] must be a positive integer;")


def test_duplicate_ids_and_model_delete_rules(client, mlp_model, mlp_path):
    client.put_model("other", mlp_path)
    client.start_deployment("mlp", deployment_id="dup", wait_for="starting")
    try:
        with pytest.raises(BadRequest, match=r"existing deployment with the same id \[dup\]"):
            client.start_deployment("mlp", deployment_id="dup")
        with pytest.raises(BadRequest, match="cannot match a different model"):
            client.start_deployment("mlp", deployment_id="other")
        with pytest.raises(Conflict, match=r"Cannot delete model \[mlp\] as it is currently deployed"):
            client.delete_model("mlp")
    finally:
        assert client.stop_deployment("dup") == {"stopped": True}
    assert client.delete_model("other") == {"acknowledged": True}
    with pytest.raises(NotFound):
        client.get_models("other")


def test_wait_for_timeout_is_408_and_keeps_the_deployment(client, mlp_model):
    with pytest.raises(ApiError) as e:
        client.start_deployment("mlp", deployment_id="slowstart", timeout="1ms", wait_for="started")
    assert e.value.status == 408
    assert e.value.reason.startswith(
        "Timed out after [1ms] waiting for trained model deployment [slowstart] to start.")
    # kept, and it goes on starting
    wait_until(lambda: client.get_stats("slowstart")["trained_model_stats"][0]["deployment_stats"]
               ["state"] == "started", 30, what="slowstart to start")
    assert client.stop_deployment("slowstart") == {"stopped": True}


def test_wait_for_starting_answers_before_allocations(client, mlp_model):
    body = client.start_deployment("mlp", deployment_id="quick", wait_for="starting")
    assert body["assignment"]["assignment_state"] == "starting"
    assert all(r["routing_state"] == "starting" for r in body["assignment"]["routing_table"].values())
    assert client.stop_deployment("quick") == {"stopped": True}


def test_stop_unknown(client):
    assert client.stop_deployment("never-was") == {"stopped": True}
    with pytest.raises(NotFound, match=r"No known model deployment with id \[never-was\]"):
        client.stop_deployment("never-was", allow_no_match=False)


def test_infer_unknown_deployment_is_404(client):
    with pytest.raises(NotFound, match=r"No known model deployment with id \[nothing\]"):
        client.infer("nothing", [{"input": np.zeros(3, np.float32)}])


def test_two_deployments_of_one_model_count_once(client, mlp_model):
    client.start_deployment("mlp", deployment_id="d1")
    client.start_deployment("mlp", deployment_id="d2")
    try:
        stats = client.get_stats()
        ids = [e["deployment_stats"]["deployment_id"] for e in stats["trained_model_stats"]]
        assert {"d1", "d2"} <= set(ids)
        assert stats["count"] == len({e["model_id"] for e in stats["trained_model_stats"]})
    finally:
        client.stop_deployment("d1")
        client.stop_deployment("d2")

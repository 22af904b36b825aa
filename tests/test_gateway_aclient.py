"""mlfleet.AsyncClient against live daemons: the same answers and errors as Client."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import mlfleet
from mlfleet.common.errors import BadRequest, NoAnswer, NotFound
from tests.helpers import running_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlp_path):
    with running_cluster(tmp_path_factory.mktemp("aclient"), {"node-a": 2}) as c:
        with c.client() as sync:
            sync.put_model("mlp", mlp_path)
        yield c


def run(coro):
    return asyncio.run(coro)


def test_async_client_is_exported_lazily():
    from mlfleet.common.aclient import AsyncClient
    assert mlfleet.AsyncClient is AsyncClient


def test_deploy_infer_stats_stop_like_the_sync_client(cluster):
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)

    async def scenario():
        async with mlfleet.AsyncClient(cluster.coordinator.endpoint, request_timeout="20s") as c:
            start = await c.start_deployment("mlp", deployment_id="amlp")
            assert start["assignment"]["assignment_state"] == "started"
            outs = await asyncio.gather(*(c.infer("amlp", [{"input": x}]) for _ in range(16)))
            stats = await c.get_stats("amlp")
            models = await c.get_models("mlp")
            with pytest.raises(BadRequest, match=r"\[timeout\] must be positive"):
                await c.infer("amlp", [{"input": x}], timeout="0s")
            stopped = await c.stop_deployment("amlp")
            with pytest.raises(NotFound):
                await c.infer("amlp", [{"input": x}])
            return outs, stats, models, stopped
    outs, stats, models, stopped = run(scenario())
    with cluster.client() as sync:
        sync.start_deployment("mlp", deployment_id="smlp")
        want = sync.infer("smlp", [{"input": x}])["inference_results"][0]["predicted_value"]
        sync.stop_deployment("smlp")
    for out in outs:
        np.testing.assert_allclose(out["inference_results"][0]["predicted_value"], want, rtol=1e-6)
    assert stats["trained_model_stats"][0]["deployment_stats"]["deployment_id"] == "amlp"
    assert models["trained_model_configs"][0]["model_id"] == "mlp"
    assert stopped == {"stopped": True}


def test_errors_are_raised_as_the_server_gave_them(cluster):
    async def scenario():
        async with mlfleet.AsyncClient(cluster.coordinator.endpoint) as c:
            with pytest.raises(NotFound, match=r"No known model deployment with id \[nope\]"):
                await c.get_stats("nope")
            with pytest.raises(BadRequest) as e:
                await c.start_deployment("mlp", threads_per_allocation=3, queue_capacity=0)
            assert e.value.type == "action_request_validation_exception"
    run(scenario())


def test_no_answer_from_a_coordinator_that_is_not_there():
    async def scenario():
        async with mlfleet.AsyncClient("tcp://127.0.0.1:1", request_timeout="1s") as c:
            with pytest.raises(NoAnswer):
                await c.get_nodes()
    run(scenario())


def test_a_failed_curve_handshake_is_said_at_once(fresh_cluster, tmp_path):
    from mlfleet.common.security import generate_keys
    secret, _ = generate_keys("coordinator", tmp_path / "keys")
    (tmp_path / "authorized").write_text("")
    c = fresh_cluster.start_coordinator(extra=["--curve-secret-key", str(secret),
                                               "--authorized-keys", str(tmp_path / "authorized")])

    async def scenario():
        async with mlfleet.AsyncClient(c.endpoint, request_timeout="20s") as ac:
            t = asyncio.get_running_loop().time()
            with pytest.raises(NoAnswer, match="requires CURVE keys and this client has none"):
                await ac.get_nodes()
            return asyncio.get_running_loop().time() - t
    assert run(scenario()) < 4.0  # not the 5 s connect timeout, nor the 20 s request timeout

"""Elasticsearch's own Python client (elasticsearch-py 8), pointed at the gateway, works: the
product check, typed calls, the upload in parts, inference, and errors raised as its classes."""

from __future__ import annotations

import base64

import pytest
import torch

from tests.gateway_support import VOCAB, TinyEncoder, start_gateway
from tests.helpers import running_cluster, save_model

elasticsearch = pytest.importorskip("elasticsearch")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def es(tmp_path_factory, mlp_path):
    work = tmp_path_factory.mktemp("es-client")
    with running_cluster(work, {"node-a": 2}) as c:
        with c.client() as sync:
            sync.put_model("mlp", mlp_path)
        g = start_gateway(work, c.coordinator.endpoint)
        client = elasticsearch.Elasticsearch(g.endpoint, request_timeout=60)
        try:
            yield client
        finally:
            client.close()
            assert g.stop() == 0


def test_deploy_infer_stats_stop(es):
    assert es.info()["version"]["number"].startswith("8.")
    r = es.ml.start_trained_model_deployment(model_id="mlp", wait_for="started", timeout="1m",
                                             deployment_id="es-mlp")
    assert r["assignment"]["assignment_state"] == "started"
    try:
        out = es.ml.infer_trained_model(model_id="es-mlp", docs=[{"input": [[0.25] * 8]}])
        assert len(out["inference_results"][0]["predicted_value"][0]) == 4
        stats = es.ml.get_trained_models_stats(model_id="es-mlp")
        assert stats["trained_model_stats"][0]["deployment_stats"]["deployment_id"] == "es-mlp"
        upd = es.ml.update_trained_model_deployment(model_id="es-mlp", number_of_allocations=2)
        assert upd["assignment"]["task_parameters"]["number_of_allocations"] == 2
        assert es.ml.clear_trained_model_deployment_cache(model_id="es-mlp")["cleared"] is True
    finally:
        assert es.ml.stop_trained_model_deployment(model_id="es-mlp")["stopped"] is True
    with pytest.raises(elasticsearch.NotFoundError):
        es.ml.get_trained_models_stats(model_id="es-mlp")
    with pytest.raises(elasticsearch.BadRequestError) as e:
        es.ml.start_trained_model_deployment(model_id="mlp", threads_per_allocation=3)
    assert e.value.error == "action_request_validation_exception"


def test_upload_the_way_eland_does(es, tmp_path):
    torch.manual_seed(5)
    data = save_model(TinyEncoder(len(VOCAB)), tmp_path / "enc.pt").read_bytes()
    es.ml.put_trained_model(model_id="es-enc", model_type="pytorch", input={"field_names": ["text_field"]},
                            inference_config={"text_embedding": {"tokenization": {"bert": {
                                "do_lower_case": True, "max_sequence_length": 16}}}})
    es.ml.put_trained_model_vocabulary(model_id="es-enc", vocabulary=VOCAB)
    size = 1000
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    for i, chunk in enumerate(chunks):
        es.ml.put_trained_model_definition_part(model_id="es-enc", part=i,
                                                definition=base64.b64encode(chunk).decode(),
                                                total_definition_length=len(data), total_parts=len(chunks))
    got = es.ml.get_trained_models(model_id="es-enc")
    assert got["trained_model_configs"][0]["fully_defined"] is True
    es.ml.start_trained_model_deployment(model_id="es-enc", wait_for="started")
    try:
        out = es.ml.infer_trained_model(model_id="es-enc", docs=[{"text_field": "the cat sat"}])
        assert len(out["inference_results"][0]["predicted_value"]) == 6
    finally:
        es.ml.stop_trained_model_deployment(model_id="es-enc")
    assert es.ml.delete_trained_model(model_id="es-enc")["acknowledged"] is True

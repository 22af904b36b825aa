"""The HTTP gateway against live daemons, with plain HTTP clients (http.client and curl): every
endpoint, its parameters from the query string and the body, validation and error shapes, the
seeds' examples as curl commands, an upload in parts followed by a deployment and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gateway_support import VOCAB, Http, TinyEncoder, b64_parts, curl, es_error, start_gateway
from tests.helpers import running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(120)

SEED_MODEL = "elastic__distilbert-base-uncased-finetuned-conll03-english"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, mlp_path):
    """A coordinator, one agent (4 processors) and a gateway without keys, on loopback."""
    work = tmp_path_factory.mktemp("gateway")
    with running_cluster(work, {"node-a": 4}) as c:
        with c.client() as sync:
            sync.put_model("mlp", mlp_path)
            sync.put_model(SEED_MODEL, mlp_path)
        g = start_gateway(work, c.coordinator.endpoint)
        try:
            g.cluster = c
            yield g
        finally:
            assert g.stop() == 0


@pytest.fixture
def http(gw):
    h = Http(gw.endpoint)
    yield h
    h.close()


def test_the_start_seed_example_runs_as_written_with_curl(gw):
    status, body = curl(f'curl -X POST "{gw.endpoint}/_ml/trained_models/{SEED_MODEL}/deployment/_start'
                        '?wait_for=started&timeout=1m"')
    try:
        assert status == 200, body
        a = body["assignment"]
        assert a["assignment_state"] == "started"
        tp = a["task_parameters"]
        assert tp["model_id"] == SEED_MODEL and tp["deployment_id"] == SEED_MODEL
        assert {"model_bytes", "threads_per_allocation", "number_of_allocations", "queue_capacity",
                "priority"} <= tp.keys()
        assert (tp["threads_per_allocation"], tp["number_of_allocations"], tp["queue_capacity"],
                tp["priority"]) == (1, 1, 1024, "normal")
        assert a["routing_table"]["node-a"]["routing_state"] == "started"
        assert a["routing_table"]["node-a"]["reason"] == ""
        assert isinstance(a["start_time"], str) and a["start_time"].endswith("Z")
        # the seed's second example: the same model again under another deployment id
        status, body = curl(f'curl -X POST "{gw.endpoint}/_ml/trained_models/{SEED_MODEL}/deployment/_start'
                            '?deployment_id=my_model_for_search"')
        assert status == 200, body
        assert body["assignment"]["task_parameters"]["deployment_id"] == "my_model_for_search"
    finally:
        for dep in (SEED_MODEL, "my_model_for_search"):
            curl(f'curl -X POST "{gw.endpoint}/_ml/trained_models/{dep}/deployment/_stop"')


def test_the_update_seed_example_runs_byte_for_byte_with_curl(gw, http):
    # the seed's curl command, as printed, with only the host replaced; curl's globbing turns
    # {model_id} into the literal model_id, so that is the deployment's id
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start?deployment_id=model_id")
    assert status == 200, body
    try:
        url = gw.endpoint + "/_ml/trained_models/{model_id}/deployment/_update"
        cmd = ("curl \\\n --request POST '" + url + "' \\\n"
               ' --header "Authorization: $API_KEY" \\\n --header "Content-Type: application/json" \\\n'
               """ --data '"{\\n  \\"number_of_allocations\\": 4\\n}"'""")
        status, body = curl(cmd, env={"API_KEY": "ApiKey unused-without-keys"})
        assert status == 200, body
        a = body["assignment"]
        assert a["task_parameters"]["number_of_allocations"] == 4
        assert {"adaptive_allocations", "assignment_state", "max_assigned_allocations", "routing_table",
                "start_time", "task_parameters"} <= a.keys()
        route = a["routing_table"]["node-a"]
        assert {"routing_state", "current_allocations", "target_allocations"} <= route.keys()
        assert route["target_allocations"] == 4
        # the seed's request example body, sent as plain JSON, is the same request
        status, _, body = http.call("POST", "/_ml/trained_models/model_id/deployment/_update",
                                 {"number_of_allocations": 2})
        assert status == 200 and body["assignment"]["task_parameters"]["number_of_allocations"] == 2
        # and as a query parameter, as the seed's "Query parameters" list it
        status, _, body = http.call("POST", "/_ml/trained_models/model_id/deployment/_update"
                                    "?number_of_allocations=1")
        assert status == 200 and body["assignment"]["task_parameters"]["number_of_allocations"] == 1
    finally:
        http.call("POST", "/_ml/trained_models/model_id/deployment/_stop")


def test_deployment_lifecycle_over_http(gw, http):
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start",
                             {"deployment_id": "life", "queue_capacity": 64, "cache_size": "1kb"})
    assert status == 200, body
    assert body["assignment"]["task_parameters"]["queue_capacity"] == 64
    assert body["assignment"]["task_parameters"]["cache_size"] == "1kb"
    try:
        for path in ("/_ml/trained_models/life/_infer", "/_ml/trained_models/life/deployment/_infer"):
            status, _, out = http.call("POST", path + "?timeout=5s", {"docs": [{"input": x.tolist()}]})
            assert status == 200, out
            with gw.cluster.client() as sync:
                want = sync.infer("life", [{"input": x}])["inference_results"][0]["predicted_value"]
            np.testing.assert_allclose(np.array(out["inference_results"][0]["predicted_value"]), want,
                                       rtol=1e-5)
        # an infer-time inference_config goes with the request to the model's task, which checks it
        status, _, out = http.call("POST", "/_ml/trained_models/life/_infer",
                                   {"docs": [{"input": x.tolist()}],
                                    "inference_config": {"pass_through": {"results_field": "y"}}})
        assert status == 200 and "y" in out["inference_results"][0], out
        status, _, out = http.call("POST", "/_ml/trained_models/life/_infer",
                                   {"docs": [{"input": x.tolist()}],
                                    "inference_config": {"pass_through": {"x": 1}}})
        assert status == 400, out
        assert "Unrecognized fields [x] in [inference_config]" in out["error"]["reason"], out

        def counted():  # agents report their counts with each heartbeat
            status, _, stats = http.call("GET", "/_ml/trained_models/life/_stats")
            assert status == 200, stats
            assert stats["count"] == 1
            ds = stats["trained_model_stats"][0]["deployment_stats"]
            return ds["deployment_id"] == "life" and ds["inference_count"] >= 5
        wait_until(counted, 20, what="the inferences counted in stats")
        status, _, every = http.call("GET", "/_ml/trained_models/_stats")
        assert status == 200 and any(e.get("deployment_stats", {}).get("deployment_id") == "life"
                                     for e in every["trained_model_stats"])
        status, _, some = http.call("GET", "/_ml/trained_models/li*,nothing*/_stats?size=1")
        assert status == 200 and [e["deployment_stats"]["deployment_id"]
                                  for e in some["trained_model_stats"]] == ["life"]
        assert http.call("POST", "/_ml/trained_models/life/deployment/cache/_clear")[2] == {"cleared": True}
        status, _, body = http.call("DELETE", "/_ml/trained_models/mlp")
        assert status == 409, body
        assert "currently deployed" in es_error(body, 409, "status_exception")
    finally:
        status, _, body = http.call("POST", "/_ml/trained_models/life/deployment/_stop", {"force": False})
    assert (status, body) == (200, {"stopped": True})
    status, _, body = http.call("POST", "/_ml/trained_models/life/_infer", {"docs": [{"input": x.tolist()}]})
    assert status == 404, body
    es_error(body, 404, "resource_not_found_exception")
    # allow_no_match (default true): stopping what is not there is fine; false: 404
    assert http.call("POST", "/_ml/trained_models/life/deployment/_stop")[0] == 200
    status, _, body = http.call("POST", "/_ml/trained_models/life/deployment/_stop?allow_no_match=false")
    assert status == 404 and "No known model deployment with id [life]" in es_error(
        body, 404, "resource_not_found_exception")


def test_stats_of_a_model_without_deployments(http):
    """As Elasticsearch lists it: an entry with the model's size, no deployment_stats."""
    status, _, body = http.call("GET", "/_ml/trained_models/mlp/_stats")
    assert status == 200, body
    assert body["count"] == 1
    (entry,) = body["trained_model_stats"]
    assert entry["model_id"] == "mlp" and "deployment_stats" not in entry
    assert entry["model_size_stats"]["model_size_bytes"] > 0
    status, _, every = http.call("GET", "/_ml/trained_models/_stats")
    assert status == 200 and {"mlp", SEED_MODEL} <= {e["model_id"] for e in every["trained_model_stats"]}
    assert every["count"] == len({e["model_id"] for e in every["trained_model_stats"]})


def test_get_models(gw, http):
    status, _, body = http.call("GET", "/_ml/trained_models/mlp")
    assert status == 200 and body["count"] == 1
    cfg = body["trained_model_configs"][0]
    assert cfg["model_id"] == "mlp" and cfg["model_type"] == "pytorch"
    status, _, body = http.call("GET", "/_ml/trained_models")
    assert status == 200 and {"mlp", SEED_MODEL} <= {c["model_id"] for c in body["trained_model_configs"]}
    status, _, body = http.call("GET", "/_ml/trained_models/_all?from=1&size=1")
    assert status == 200 and body["count"] >= 2 and len(body["trained_model_configs"]) == 1
    status, _, body = http.call("GET", "/_ml/trained_models/ml*")
    assert status == 200 and [c["model_id"] for c in body["trained_model_configs"]] == ["mlp"]
    status, _, body = http.call("GET", "/_ml/trained_models/nothing*?allow_no_match=false")
    assert status == 404, body
    status, _, body = http.call("GET", "/_ml/trained_models/missing")
    assert status == 404 and "missing" in es_error(body, 404, "resource_not_found_exception")
    status, _, body = http.call("GET", "/_ml/trained_models/mlp,missing")
    assert status == 404 and "missing" in es_error(body, 404, "resource_not_found_exception")


@pytest.mark.parametrize("method,path,body,status,etype,reason", [
    # Elasticsearch's validation, all rules at once
    ("POST", "/_ml/trained_models/mlp/deployment/_start?threads_per_allocation=3&queue_capacity=0", None,
     400, "action_request_validation_exception",
     "[threads_per_allocation] must be a power of 2 less than or equal to 32"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start", {"wait_for": "done"}, 400,
     "action_request_validation_exception", "invalid [wait_for] state [done]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start", {"priority": "low", "number_of_allocations": 2},
     400, "action_request_validation_exception", "[number_of_allocations] must be 1 when [priority] is low"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start?timeout=10", None, 400, None, "[timeout]"),
    ("POST", "/_ml/trained_models/nope/deployment/_start", None, 404, "resource_not_found_exception", "nope"),
    ("POST", "/_ml/trained_models/nope/deployment/_update", {"number_of_allocations": 2}, 404,
     "resource_not_found_exception", "No known model deployment with id [nope]"),
    ("POST", "/_ml/trained_models/nope/deployment/cache/_clear", None, 404, "resource_not_found_exception",
     "nope"),
    ("GET", "/_ml/trained_models/nope/_stats", None, 404, "resource_not_found_exception", "nope"),
    ("DELETE", "/_ml/trained_models/nope", None, 404, "resource_not_found_exception", "nope"),
    # the HTTP layer's own rules
    ("POST", "/_ml/trained_models/mlp/deployment/_start?number_of_allocations=two", None, 400,
     "illegal_argument_exception", "Failed to parse int parameter [number_of_allocations] with value [two]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start?bogus=1&other=2", None, 400,
     "illegal_argument_exception", "contains unrecognized parameters: [bogus], [other]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start", {"bogus": 1}, 400, "x_content_parse_exception",
     "[start_trained_model_deployment] unknown field [bogus]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start", {"number_of_allocations": "two"}, 400,
     "x_content_parse_exception", "failed to parse field [number_of_allocations]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start?queue_capacity=5", {"queue_capacity": 6}, 400,
     "illegal_argument_exception", "[queue_capacity] is set in the query string [5] and in the body [6]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_start?adaptive_allocations=1", None, 400,
     "illegal_argument_exception", "[adaptive_allocations]"),
    ("POST", "/_ml/trained_models/mlp/deployment/_stop?force=maybe", None, 400, "illegal_argument_exception",
     "Failed to parse value [maybe] as only [true] or [false] are allowed."),
    ("POST", "/_ml/trained_models/mlp/_infer", {}, 400, "action_request_validation_exception",
     "[docs] is required"),
    ("POST", "/_ml/trained_models/mlp/_infer", {"docs": []}, 400, "action_request_validation_exception",
     "at least one document"),
    ("POST", "/_ml/trained_models/mlp/_infer", {"docs": [1]}, 400, "x_content_parse_exception",
     "[docs.0] is not an object"),
    ("POST", "/_ml/trained_models/mlp/_infer", {"docs": [{"input": [[1, 2], [3]]}]}, 400,
     "x_content_parse_exception", "[docs.0.input] is not a rectangular array"),
    ("POST", "/_ml/trained_models/mlp/_infer?timeout=soon", {"docs": [{"input": [[1.0]]}]}, 400,
     "illegal_argument_exception", "failed to parse setting [timeout] with value [soon]"),
    ("POST", "/_ml/trained_models/mlp/_infer?docs=1", None, 400, "illegal_argument_exception",
     "unrecognized parameter: [docs]"),
    ("GET", "/_ml/trained_models/_stats?from=-1", None, 400, "illegal_argument_exception",
     "[from] parameter cannot be negative"),
    ("POST", "/_ml/trained_models/mlp/deployment/cache/_clear", {"x": 1}, 400, "x_content_parse_exception",
     "does not support having a body"),
    ("GET", "/_ml/nothing_here", None, 400, "illegal_argument_exception",
     "no handler found for uri [/_ml/nothing_here] and method [GET]"),
    ("GET", "/_ml/trained_models/mlp/deployment/_start", None, 405, "method_not_allowed",
     "Incorrect HTTP method for uri [/_ml/trained_models/mlp/deployment/_start] and method [GET], "
     "allowed: [POST]"),
])
def test_errors_in_elasticsearch_shape(http, method, path, body, status, etype, reason):
    got_status, headers, got = http.call(method, path, body)
    assert got_status == status, got
    assert headers["content-type"].startswith("application/json")
    err = got["error"]
    assert got["status"] == status
    assert err["root_cause"][0] == {k: err[k] for k in err if k != "root_cause"}
    if etype:
        assert err["type"] == etype, got
    assert reason in err["reason"], got


def test_malformed_bodies(http):
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start", raw=b"{not json")
    assert status == 400 and "not valid JSON" in es_error(body, 400, "x_content_parse_exception")
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start", raw=b"[1]")
    assert status == 400 and "JSON object" in es_error(body, 400, "x_content_parse_exception")
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start", raw=b"{}",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 406 and "Content-Type header [application/x-www-form-urlencoded] is not supported" in (
        es_error(body, 406, "media_type_header_exception"))
    # the daemon goes on
    assert http.call("GET", "/_ml/trained_models/mlp")[0] == 200


def test_pretty_root_and_openapi(gw):
    status, body = curl(f'curl "{gw.endpoint}/_ml/trained_models/mlp?pretty"')
    assert status == 200 and body["count"] == 1
    h = Http(gw.endpoint)
    try:
        status, headers, root = h.call("GET", "/")
        assert status == 200 and headers["x-elastic-product"] == "Elasticsearch"
        assert root["version"]["number"].startswith("8.")
        status, _, spec = h.call("GET", "/_mlfleet/openapi.json")
        assert status == 200 and spec["openapi"].startswith("3.")
        start = spec["paths"]["/_ml/trained_models/{model_id}/deployment/_start"]["post"]
        assert {p["name"] for p in start["parameters"]} >= {"model_id", "wait_for", "timeout",
                                                             "number_of_allocations"}
        assert "adaptive_allocations" in start["requestBody"]["content"]["application/json"]["schema"][
            "properties"]
    finally:
        h.close()


def test_upload_in_parts_then_deploy_and_infer(gw, http, tmp_path):
    torch.manual_seed(3)
    path = save_model(TinyEncoder(len(VOCAB)), tmp_path / "enc.pt")
    data = path.read_bytes()
    parts = b64_parts(data, 3)
    status, _, body = http.call("PUT", "/_ml/trained_models/enc", {
        "description": "tiny", "model_type": "pytorch", "input": {"field_names": ["text_field"]},
        "inference_config": {"text_embedding": {"tokenization": {"bert": {
            "do_lower_case": True, "max_sequence_length": 16, "with_special_tokens": True}}}}})
    assert status == 200, body
    assert body["model_id"] == "enc" and body["fully_defined"] is False
    status, _, body = http.call("PUT", "/_ml/trained_models/enc",
                                {"inference_config": {"text_embedding": {}}})
    assert status == 400 and "already exists" in es_error(body, 400, "resource_already_exists_exception")
    # parts out of order, one sent twice; the last one in stores nothing yet: the vocabulary is missing
    total = {"total_definition_length": len(data), "total_parts": 3}
    for i in (2, 0, 0, 1):
        status, _, body = http.call("PUT", f"/_ml/trained_models/enc/definition/{i}",
                                    {"definition": parts[i], **total})
        assert (status, body) == (200, {"acknowledged": True}), body
    status, _, body = http.call("GET", "/_ml/trained_models/enc")  # in progress, as Elasticsearch shows it
    assert status == 200 and body["trained_model_configs"][0]["fully_defined"] is False
    every = http.call("GET", "/_ml/trained_models/_all")[2]["trained_model_configs"]
    assert "enc" in [c["model_id"] for c in every]
    status, _, body = http.call("PUT", "/_ml/trained_models/enc/vocabulary", {"vocabulary": VOCAB})
    assert (status, body) == (200, {"acknowledged": True}), body
    status, _, body = http.call("GET", "/_ml/trained_models/enc")
    assert status == 200 and body["trained_model_configs"][0]["task"] == "text_embedding"
    assert body["trained_model_configs"][0]["fully_defined"] is True
    assert body["trained_model_configs"][0]["model_size_bytes"] == len(data)
    status, _, body = http.call("POST", "/_ml/trained_models/enc/deployment/_start")
    assert status == 200, body
    try:
        status, _, out = http.call("POST", "/_ml/trained_models/enc/_infer",
                                {"docs": [{"text_field": "Hello cats"}, {"text_field": "the world"}]})
        assert status == 200, out
        vecs = [r["predicted_value"] for r in out["inference_results"]]
        assert len(vecs) == 2 and all(len(v) == 6 and all(isinstance(f, float) for f in v) for v in vecs)
        # "hello cats" -> [CLS] hello cat ##s [SEP], lower-cased: the mean of those embeddings
        enc = torch.jit.load(str(path))
        ids = torch.tensor([[2, 4, 7, 9, 3]])
        want = enc(ids, torch.ones_like(ids)).mean(dim=1)[0]
        np.testing.assert_allclose(vecs[0], want.detach().numpy(), rtol=1e-5)
    finally:
        http.call("POST", "/_ml/trained_models/enc/deployment/_stop")
    assert http.call("DELETE", "/_ml/trained_models/enc")[2] == {"acknowledged": True}


@pytest.mark.parametrize("part,body,status,reason", [
    ("0", {"definition": "AAAA", "total_definition_length": 0, "total_parts": 0}, 400,
     "Validation Failed: 1: [total_definition_length] must be greater than 0;2: [total_parts] must be "
     "greater than 0;"),
    ("3", {"definition": "AAAA", "total_definition_length": 3, "total_parts": 2}, 400,
     "[part] must be less than total_parts"),
    ("-1", {"definition": "AAAA", "total_definition_length": 3, "total_parts": 2}, 400,
     "[part] must be greater or equal to 0"),
    ("x", {"definition": "AAAA", "total_definition_length": 3, "total_parts": 2}, 400,
     "Failed to parse int parameter [part] with value [x]"),
    ("0", {"definition": "!!", "total_definition_length": 3, "total_parts": 2}, 400, "not valid base64"),
    ("0", {"definition": "AAAAAAAA", "total_definition_length": 3, "total_parts": 2}, 400,
     "more than [total_definition_length] [3]"),
    ("0", {"total_definition_length": 3, "total_parts": 2}, 400, "[definition] is required"),
])
def test_definition_part_rules(http, part, body, status, reason):
    assert http.call("PUT", "/_ml/trained_models/parts", {"inference_config": {"pass_through": {}}})[0] == 200
    try:
        got_status, _, got = http.call("PUT", f"/_ml/trained_models/parts/definition/{part}", body)
        assert got_status == status, got
        assert reason in got["error"]["reason"], got
    finally:
        assert http.call("DELETE", "/_ml/trained_models/parts")[0] == 200


def test_a_part_for_an_unknown_model_and_bad_configs(http):
    status, _, body = http.call("PUT", "/_ml/trained_models/ghost/definition/0",
                                {"definition": "AAAA", "total_definition_length": 3, "total_parts": 1})
    assert status == 404 and "Could not find trained model [ghost]" in es_error(
        body, 404, "resource_not_found_exception")
    status, _, body = http.call("PUT", "/_ml/trained_models/bad", {"inference_config": {"fill_mask": {}}})
    assert status == 400 and "task [fill_mask] is not supported" in es_error(
        body, 400, "illegal_argument_exception")
    status, _, body = http.call("PUT", "/_ml/trained_models/bad", {"description": "no config"})
    assert status == 400 and "[inference_config] is required" in body["error"]["reason"]


def test_a_definition_whose_parts_do_not_add_up_is_refused_and_pass_through_needs_no_vocabulary(
        http, mlp_path):
    data = mlp_path.read_bytes()
    assert http.call("PUT", "/_ml/trained_models/pt", {"inference_config": {"pass_through": {}}})[0] == 200
    status, _, body = http.call("PUT", "/_ml/trained_models/pt/vocabulary", {"vocabulary": VOCAB})
    assert status == 400 and "takes no vocabulary" in body["error"]["reason"]
    status, _, body = http.call("PUT", "/_ml/trained_models/pt/definition/0", {
        "definition": b64_parts(data, 1)[0], "total_definition_length": len(data) + 1, "total_parts": 1})
    assert status == 400 and "add up to" in body["error"]["reason"]
    assert http.call("PUT", "/_ml/trained_models/pt", {"inference_config": {"pass_through": {}}})[0] == 200
    status, _, body = http.call("PUT", "/_ml/trained_models/pt/definition/0", {
        "definition": b64_parts(data, 1)[0], "total_definition_length": len(data), "total_parts": 1})
    assert status == 200, body
    status, _, body = http.call("GET", "/_ml/trained_models/pt")
    assert status == 200 and body["trained_model_configs"][0]["model_size_bytes"] == len(data)
    # force: a deployed model is stopped, then deleted
    assert http.call("POST", "/_ml/trained_models/pt/deployment/_start")[0] == 200
    assert http.call("DELETE", "/_ml/trained_models/pt?force=true")[2] == {"acknowledged": True}
    assert http.call("GET", "/_ml/trained_models/pt/_stats")[0] == 404


def test_adaptive_allocations_in_the_body(http):
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start?deployment_id=ada", {
        "adaptive_allocations": {"enabled": True, "min_number_of_allocations": 1,
                                 "max_number_of_allocations": 2}})
    assert status == 200, body
    try:
        assert body["assignment"]["adaptive_allocations"] == {
            "enabled": True, "min_number_of_allocations": 1, "max_number_of_allocations": 2}
        status, _, body = http.call("POST", "/_ml/trained_models/ada/deployment/_update",
                                    {"number_of_allocations": 2})
        reason = es_error(body, 400, "action_request_validation_exception")
        assert "[number_of_allocations] cannot be set if adaptive allocations is enabled" in reason
        status, _, body = http.call("POST", "/_ml/trained_models/ada/deployment/_update",
                                    {"adaptive_allocations": {"enabled": False}})
        assert status == 200 and body["assignment"]["adaptive_allocations"]["enabled"] is False, body
    finally:
        http.call("POST", "/_ml/trained_models/ada/deployment/_stop")


def test_a_coordinator_that_is_not_there_is_a_503_and_the_gateway_goes_on(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: nothing answers
    g = start_gateway(tmp_path, dead, extra=["--request-timeout", "1s"])
    h = Http(g.endpoint)
    try:
        for _ in range(2):
            status, _, body = h.call("GET", "/_ml/trained_models/_stats")
            assert status == 503, body
            assert "no answer from" in es_error(body, 503, "transport_exception")
    finally:
        h.close()
        s.close()
        assert g.stop() == 0


def test_a_full_queue_is_429_with_retry_after(gw, tmp_path):
    import concurrent.futures as cf

    from tests.helpers import Slow
    with gw.cluster.client() as sync:
        sync.put_model("slow", save_model(Slow(), tmp_path / "slow.pt"))
    h = Http(gw.endpoint)
    try:
        assert h.call("POST", "/_ml/trained_models/slow/deployment/_start?queue_capacity=1")[0] == 200

        def one(_):
            c = Http(gw.endpoint)
            try:
                return c.call("POST", "/_ml/trained_models/slow/_infer", {"docs": [{"input": [0.4]}]})
            finally:
                c.close()
        with cf.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(6)))
        full = [a for a in answers if a[0] == 429]
        assert full and any(a[0] == 200 for a in answers), [a[0] for a in answers]
        status, headers, body = full[0]
        es_error(body, 429, "es_rejected_execution_exception")
        assert int(headers["retry-after"]) >= 1 and body["error"]["retry_after_ms"] >= 0
    finally:
        h.call("POST", "/_ml/trained_models/slow/deployment/_stop")
        h.call("DELETE", "/_ml/trained_models/slow")
        h.close()


def test_infer_on_a_model_id_uses_its_deployment(http):
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/deployment/_start?deployment_id=for_search")
    assert status == 200, body
    try:
        status, _, out = http.call("POST", "/_ml/trained_models/mlp/_infer",
                                   {"docs": [{"input": [[0.0] * 8]}]})
        assert status == 200, out
        assert len(out["inference_results"][0]["predicted_value"][0]) == 4
    finally:
        http.call("POST", "/_ml/trained_models/for_search/deployment/_stop")
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/_infer", {"docs": [{"input": [[0.0] * 8]}]})
    assert status == 404, body


def _nested_json(depth: int, leaf: bytes = b"") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


@pytest.mark.parametrize("raw,type,why", [
    # past the JSON parser's recursion: RecursionError
    (b"[" * 100_000, "x_content_parse_exception", "request body nests too deeply"),
    (b'{"docs":[{"input":' + _nested_json(3000, b"1") + b"}]}", "x_content_parse_exception",
     "request body nests too deeply"),
    # an integer past Python's digit limit: ValueError
    (b'{"docs":[{"input":' + b"1" * 5000 + b"}]}", "x_content_parse_exception",
     "request body holds a number of more than"),
    # parsed, but nested past what the encoder to the agent can walk
    (b'{"docs":[{"text_field":' + _nested_json(900) + b"}]}", "status_exception", "nest too deeply"),
])
def test_hostile_bodies_are_400_naming_the_rule_and_log_no_traceback(gw, http, raw, type, why):
    before = gw.log.stat().st_size
    status, _, body = http.call("POST", "/_ml/trained_models/mlp/_infer?timeout=1s", raw=raw)
    assert status == 400, body
    assert why in es_error(body, 400, type)
    with gw.log.open("rb") as f:
        f.seek(before)
        assert b"Traceback" not in f.read()


@pytest.mark.parametrize("timeout", ["1" + "0" * 400 + "s", "2h"])
def test_an_infinite_or_absurd_infer_timeout_is_400_naming_it(gw, http, timeout):
    before = gw.log.stat().st_size
    status, _, body = http.call("POST", f"/_ml/trained_models/mlp/_infer?timeout={timeout}",
                                {"docs": [{"input": [[0.0] * 8]}]})
    assert status == 400, body
    assert "[timeout]" in body["error"]["reason"], body
    with gw.log.open("rb") as f:
        f.seek(before)
        assert b"Traceback" not in f.read()

"""The gateway's API keys and roles (401/403 in Elasticsearch's shape), the keys file and
`mlfleet keys api-key`, TLS, and its refusal to serve off loopback without both."""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys

import pytest

from tests.gateway_support import Http, es_error, start_gateway
from tests.helpers import ROOT, running_cluster, wait_until

pytestmark = pytest.mark.timeout(120)


def mlfleet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "mlfleet", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def api_key(keys_file, name: str, role: str) -> dict:
    return json.loads(mlfleet("keys", "api-key", name, "--role", role, "--keys-file", str(keys_file)).stdout)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, mlp_path):
    work = tmp_path_factory.mktemp("gateway-keys")
    keys_file = work / "api_keys"
    admin, reader = api_key(keys_file, "ops", "admin"), api_key(keys_file, "app", "infer")
    with running_cluster(work, {"node-a": 2}) as c:
        with c.client() as sync:
            sync.put_model("mlp", mlp_path)
            sync.start_deployment("mlp")
        g = start_gateway(work, c.coordinator.endpoint, extra=["--api-keys", str(keys_file)])
        try:
            yield g, keys_file, admin, reader
        finally:
            assert g.stop() == 0


def test_keys_file_holds_no_secret_and_is_private(secured):
    _, keys_file, admin, reader = secured
    text = keys_file.read_text()
    assert admin["api_key"] not in text and reader["api_key"] not in text
    assert oct(os.stat(keys_file).st_mode & 0o777) == "0o600"
    assert base64.b64decode(admin["encoded"]).decode() == f"{admin['id']}:{admin['api_key']}"
    assert (admin["name"], admin["role"]) == ("ops", "admin")
    p = mlfleet("keys", "api-key", "x", "--role", "agent", "--keys-file", str(keys_file), check=False)
    assert p.returncode == 2 and "[role] must be one of" in p.stderr


@pytest.mark.parametrize("header,why", [
    (None, "missing authentication credentials for REST request [/_ml/trained_models/_stats]"),
    ("ApiKey " + base64.b64encode(b"nobody:secret").decode(), "API key id [nobody]"),
    ("ApiKey !!!", "not base64 of id:api_key"),
    ("ApiKey \u00e9\u00e9", "not base64 of id:api_key"),  # not ASCII: b64decode's plain ValueError
    ("Basic " + base64.b64encode(b"elastic:changeme").decode(), "scheme [Basic]"),
])
def test_no_valid_key_is_401(secured, header, why):
    g = secured[0]
    h = Http(g.endpoint)
    try:
        status, headers, body = h.call("GET", "/_ml/trained_models/_stats",
                                       headers={"Authorization": header} if header else None)
    finally:
        h.close()
    assert status == 401
    assert why in es_error(body, 401, "security_exception")
    assert "ApiKey" in headers["www-authenticate"]


def test_a_wrong_secret_for_a_known_id_is_401(secured):
    g, _, admin, _ = secured
    forged = base64.b64encode(f"{admin['id']}:{'x' * 22}".encode()).decode()
    h = Http(g.endpoint, forged)
    try:
        status, _, body = h.call("GET", "/_ml/trained_models/_stats")
    finally:
        h.close()
    assert status == 401, body


def test_roles(secured):
    g, _, admin, reader = secured
    app, ops = Http(g.endpoint, reader["encoded"]), Http(g.endpoint, admin["encoded"])
    try:
        # infer: inference and reads
        assert app.call("GET", "/_ml/trained_models/_stats")[0] == 200
        assert app.call("GET", "/_ml/trained_models/mlp")[0] == 200
        status, _, out = app.call("POST", "/_ml/trained_models/mlp/_infer",
                                  {"docs": [{"input": [[0.5] * 8]}]})
        assert status == 200 and len(out["inference_results"][0]["predicted_value"][0]) == 4
        # ... and nothing that changes the cluster
        for method, path in (("POST", "/_ml/trained_models/mlp/deployment/_start?deployment_id=two"),
                             ("POST", "/_ml/trained_models/mlp/deployment/_update?number_of_allocations=2"),
                             ("POST", "/_ml/trained_models/mlp/deployment/_stop"),
                             ("POST", "/_ml/trained_models/mlp/deployment/cache/_clear"),
                             ("DELETE", "/_ml/trained_models/mlp"),
                             ("PUT", "/_ml/trained_models/new")):
            status, _, body = app.call(method, path)
            assert status == 403, (path, body)
            reason = es_error(body, 403, "security_exception")
            assert f"is unauthorized for API key id [{reader['id']}] of user [app]" in reason
            assert reason.startswith("action [cluster:admin/xpack/ml/")
        # admin: everything
        status, _, body = ops.call("POST", "/_ml/trained_models/mlp/deployment/cache/_clear")
        assert (status, body) == (200, {"cleared": True})
    finally:
        app.close()
        ops.close()


def test_keys_are_added_and_revoked_without_a_restart(secured):
    g, keys_file, _, _ = secured
    new = api_key(keys_file, "later", "infer")
    h = Http(g.endpoint, new["encoded"])
    try:
        wait_until(lambda: h.call("GET", "/_ml/trained_models/_stats")[0] == 200, 15, what="the new key")
        lines = [ln for ln in keys_file.read_text().splitlines() if new["id"] not in ln]
        keys_file.write_text("\n".join(lines) + "\n")
        wait_until(lambda: h.call("GET", "/_ml/trained_models/_stats")[0] == 401, 15, what="the revocation")
        # a malformed edit keeps the keys already loaded
        with open(keys_file, "a") as f:
            f.write("superuser broken line\n")
        ops = Http(g.endpoint, secured[2]["encoded"])

        def logged():  # the file is looked at when a request comes
            assert ops.call("GET", "/_ml/trained_models/_stats")[0] == 200
            return "keeping the" in g.log.read_text()
        wait_until(logged, 15, what="the bad edit to be logged")
        ops.close()
        keys_file.write_text("\n".join(lines) + "\n")
    finally:
        h.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


def test_tls(tmp_path, cert, mlp_path):
    crt, key = cert
    keys_file = tmp_path / "api_keys"
    admin = api_key(keys_file, "ops", "admin")
    with running_cluster(tmp_path, {}) as c:
        g = start_gateway(tmp_path, c.coordinator.endpoint, listen="https://127.0.0.1:0",
                          extra=["--tls-cert", str(crt), "--tls-key", str(key), "--api-keys", str(keys_file)])
        try:
            assert g.endpoint.startswith("https://127.0.0.1:")
            ctx = ssl.create_default_context(cafile=str(crt))
            h = Http(g.endpoint, admin["encoded"], context=ctx)
            try:
                status, _, body = h.call("GET", "/_ml/trained_models")
                assert (status, body) == (200, {"count": 0, "trained_model_configs": []})
            finally:
                h.close()
            # curl, as a user would, trusting the certificate
            p = subprocess.run(["curl", "--silent", "--cacert", str(crt), "-H",
                                f"Authorization: ApiKey {admin['encoded']}",
                                f"{g.endpoint}/_ml/trained_models/_stats"],
                               capture_output=True, text=True, timeout=30)
            assert json.loads(p.stdout) == {"count": 0, "trained_model_stats": []}
            # plain HTTP to the TLS port gets no answer in HTTP
            plain = Http(g.endpoint.replace("https://", "http://"))
            with pytest.raises((OSError, http.client.HTTPException)):
                plain.call("GET", "/_ml/trained_models")
            plain.close()
        finally:
            assert g.stop() == 0


@pytest.mark.parametrize("args,why", [
    (["--listen", "http://0.0.0.0:0"], "refusing to listen on http://0.0.0.0:0 without TLS and API keys"),
    (["--listen", "https://127.0.0.1:0"], "pass --tls-cert and --tls-key"),
    (["--listen", "tcp://127.0.0.1:0"], "--listen must be http://HOST:PORT or https://HOST:PORT"),
])
def test_refuses_to_start_insecurely(args, why):
    p = mlfleet("gateway", *args, check=False)
    assert p.returncode == 2, p.stderr
    assert why in p.stderr


def test_refuses_off_loopback_with_tls_but_no_keys_and_a_bad_keys_file(tmp_path, cert):
    crt, key = cert
    p = mlfleet("gateway", "--listen", "https://0.0.0.0:0", "--tls-cert", str(crt), "--tls-key", str(key),
                check=False)
    assert p.returncode == 2 and "refusing to listen" in p.stderr
    bad = tmp_path / "keys"
    bad.write_text("root abc def ghi\n")
    p = mlfleet("gateway", "--listen", "http://127.0.0.1:0", "--api-keys", str(bad), check=False)
    assert p.returncode == 2 and "expected 'ROLE ID SHA256 NAME'" in p.stderr


def test_elasticsearch_client_with_api_keys(secured):
    elasticsearch = pytest.importorskip("elasticsearch")
    g, _, admin, reader = secured
    with elasticsearch.Elasticsearch(g.endpoint, api_key=reader["encoded"]) as app:
        assert app.ml.get_trained_models_stats()["count"] >= 1
        with pytest.raises(elasticsearch.AuthorizationException):
            app.ml.start_trained_model_deployment(model_id="mlp", deployment_id="nope")
    with elasticsearch.Elasticsearch(g.endpoint, api_key=(admin["id"], "wrong")) as bad:
        with pytest.raises(elasticsearch.AuthenticationException):
            bad.ml.get_trained_models()


def test_config_show_gateway(tmp_path):
    import os
    env = dict(os.environ, MLFLEET_GATEWAY_REQUEST_TIMEOUT="5s")
    p = subprocess.run([sys.executable, "-m", "mlfleet", "config", "show", "gateway", "--listen",
                        "http://127.0.0.1:9201"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env=env)
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown["listen"] == "http://127.0.0.1:9201" and shown["request_timeout_s"] == 5.0

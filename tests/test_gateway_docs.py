"""The gateway's documents stay current: the rendered OpenAPI document is what it serves."""

from __future__ import annotations

import json

from mlfleet.gateway.openapi import openapi
from tests.helpers import ROOT


def test_the_rendered_openapi_document_is_current():
    """Regenerate with: python -m mlfleet.gateway.openapi > docs/gateway-openapi.json"""
    assert json.loads((ROOT / "docs" / "gateway-openapi.json").read_text()) == openapi()


def test_every_endpoint_of_the_issue_is_described():
    paths = openapi()["paths"]
    model = "/_ml/trained_models/{model_id}"
    assert set(paths[model]) == {"put", "get", "delete"}
    for suffix, method in (("/definition/{part}", "put"), ("/vocabulary", "put"),
                           ("/deployment/_start", "post"), ("/deployment/_update", "post"),
                           ("/deployment/_stop", "post"), ("/deployment/cache/_clear", "post"),
                           ("/_stats", "get"), ("/_infer", "post"), ("/deployment/_infer", "post")):
        assert method in paths[model + suffix], suffix
    assert "get" in paths["/_ml/trained_models/_stats"] and "get" in paths["/_ml/trained_models"]

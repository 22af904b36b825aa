"""The OpenAPI 3.1 document of the gateway, generated from ``esapi.ENDPOINTS`` (the same table
the gateway routes and validates with, so the two cannot drift apart). Served at
``/_mlfleet/openapi.json``; ``python -m mlfleet.gateway.openapi`` prints it (docs/gateway-openapi.json).
"""

from __future__ import annotations

import json
import re
from typing import Any

from mlfleet.gateway.esapi import BODY, ENDPOINTS, QUERY, Param

_SCHEMA = {"string": {"type": "string"}, "integer": {"type": "integer"}, "boolean": {"type": "boolean"},
           "time": {"type": "string", "description": "A time value: 500ms, 30s, 1m, 2h."},
           "bytes": {"oneOf": [{"type": "string"}, {"type": "integer"}],
                     "description": "A byte value: 0b, 512kb, 100mb."},
           "object": {"type": "object"}, "array": {"type": "array"}}
_ERROR = {"type": "object", "required": ["error", "status"], "properties": {
    "status": {"type": "integer"},
    "error": {"type": "object", "required": ["root_cause", "type", "reason"], "properties": {
        "root_cause": {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string"}, "reason": {"type": "string"}}}},
        "type": {"type": "string"}, "reason": {"type": "string"}}}}}


def _schema(p: Param) -> dict[str, Any]:
    s = dict(_SCHEMA[p.kind])
    if p.default is not None:
        s["default"] = p.default
    return s


def openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        for path in ep.paths:
            names = re.findall(r"{(\w+)}", path)
            params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                      for n in names]
            params += [{"name": p.name, "in": "query", "description": p.doc, "schema": _schema(p)}
                       for p in ep.params if p.where != BODY]
            op: dict[str, Any] = {
                "operationId": ep.api + ("" if path == ep.paths[0] else f"_{ep.paths.index(path)}"),
                "summary": ep.summary,
                "description": f"Elasticsearch action `{ep.action}`; needs an API key with role "
                               f"`{ep.role}`{' or `admin`' if ep.role == 'infer' else ''} when keys are on.",
                "parameters": params,
                "responses": {"200": {"description": "As Elasticsearch answers.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "default": {"description": "An error, in Elasticsearch's shape.",
                                          "content": {"application/json": {
                                              "schema": {"$ref": "#/components/schemas/Error"}}}}}}
            body = [p for p in ep.params if p.where != QUERY]
            if body:
                op["requestBody"] = {"required": any(p.required for p in body), "content": {
                    "application/json": {"schema": {
                        "type": "object", "additionalProperties": False,
                        "required": [p.name for p in body if p.required],
                        "properties": {p.name: {**_schema(p), "description": p.doc} for p in body}}}}}
            paths.setdefault(path, {})[ep.method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "mlfleet gateway: Elasticsearch trained-model API", "version": "0.1.0"},
            "paths": paths,
            "components": {"schemas": {"Error": _ERROR},
                           "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header",
                                                          "name": "Authorization",
                                                          "description": "ApiKey <base64 of id:api_key>"}}},
            "security": [{"ApiKey": []}]}


if __name__ == "__main__":
    print(json.dumps(openapi(), indent=2))

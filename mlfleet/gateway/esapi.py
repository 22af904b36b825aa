"""Elasticsearch's REST conventions, as the gateway speaks them: the endpoints (method, paths,
the action name a 403 names, the role that may call it, parameters and where each may come
from), how a request's query string and JSON body become one set of typed parameters, and the
error body ``{"error": {"root_cause": [...], "type", "reason"}, "status"}``.

Pure: no I/O, no sockets. The handlers are in ``server.py``; the OpenAPI document is generated
from ``ENDPOINTS`` (``openapi.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from mlfleet.common.errors import ApiError


class EsError(Exception):
    """An error answered in Elasticsearch's shape (the gateway's own: parsing, auth, routing)."""

    def __init__(self, status: int, type: str, reason: str, *, headers: Optional[dict[str, str]] = None,
                 extra: Optional[dict[str, Any]] = None) -> None:
        super().__init__(reason)
        self.status, self.type, self.reason = status, type, reason
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.type, self.reason, self.extra)


def error_body(status: int, type: str, reason: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    cause = {"type": type, "reason": reason, **(extra or {})}
    return {"error": {"root_cause": [dict(cause)], **cause}, "status": status}


def from_api_error(e: ApiError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """An mlfleet error as Elasticsearch answers it: status, body, headers (a full queue's
    ``retry_after_ms`` also as ``Retry-After``, in whole seconds)."""
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if e.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-e.retry_after_ms // 1000)))
        extra["retry_after_ms"] = e.retry_after_ms
    return e.status, error_body(e.status, e.type, e.reason, extra), headers


def illegal(reason: str) -> EsError:
    return EsError(400, "illegal_argument_exception", reason)


def parse_error(reason: str) -> EsError:
    return EsError(400, "x_content_parse_exception", reason)


# ---- endpoints and their parameters -------------------------------------------------------------

QUERY, BODY, BOTH = "query", "body", "both"


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                 # string, integer, boolean, time, bytes, object, array
    where: str = BOTH         # query, body or both
    default: Any = None
    doc: str = ""
    required: bool = False


@dataclass(frozen=True)
class Endpoint:
    api: str                  # Elasticsearch's name for it (rest-api-spec), e.g. ml.infer_trained_model
    method: str
    paths: tuple[str, ...]    # aiohttp patterns; {model_id} and {part} are path parameters
    action: str               # Elasticsearch's action name, as a 403 names it
    role: str                 # the least role that may call it: infer (read and infer) or admin
    summary: str
    params: tuple[Param, ...] = ()

    @property
    def parser(self) -> str:
        return self.api.removeprefix("ml.")


_MODEL = "/_ml/trained_models/{model_id}"
_ALLOW_NO_MATCH = Param("allow_no_match", "boolean", QUERY, True,
                        "Whether a wildcard or `_all` that matches nothing is an empty answer (true) "
                        "or a 404 (false).")
_PAGE = (Param("from", "integer", QUERY, 0, "Skip this many entries."),
         Param("size", "integer", QUERY, 100, "Return at most this many entries."))
_ADAPTIVE = Param("adaptive_allocations", "object", BODY, None,
                  "`{enabled, min_number_of_allocations, max_number_of_allocations}`.")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("ml.put_trained_model", "PUT", (_MODEL,), "cluster:admin/xpack/ml/inference/put", "admin",
             "Create a trained model: its configuration; the definition follows in parts.",
             (Param("defer_definition_decompression", "boolean", QUERY, False, "Accepted; no effect."),
              Param("wait_for_completion", "boolean", QUERY, False, "Accepted; no effect."),
              Param("inference_config", "object", BODY, None,
                    "`{TASK: {...}}`: the task (pass_through, text_embedding, ...) and its settings.",
                    required=True),
              Param("model_type", "string", BODY, "pytorch", "Only `pytorch`."),
              Param("input", "object", BODY, None, "`{field_names: [...]}`."),
              Param("description", "string", BODY, None, "Free text."),
              Param("metadata", "object", BODY, None, "Free JSON."),
              Param("tags", "array", BODY, None, "Strings."),
              Param("model_size_bytes", "integer", BODY, None, "Accepted; the stored size is measured."),
              Param("platform_architecture", "string", BODY, None, "Accepted; no effect."),
              Param("prefix_strings", "object", BODY, None, "Accepted; no effect."),
              Param("location", "object", BODY, None, "Accepted; no effect."))),
    Endpoint("ml.put_trained_model_definition_part", "PUT", (_MODEL + "/definition/{part}",),
             "cluster:admin/xpack/ml/trained_models/part/put", "admin",
             "Upload one part of a model's definition (base64); the last one stores the model.",
             (Param("definition", "string", BODY, None, "This part's bytes, base64.", required=True),
              Param("total_definition_length", "integer", BODY, None,
                    "The definition's length in bytes once decoded, all parts together.", required=True),
              Param("total_parts", "integer", BODY, None, "How many parts there are.", required=True))),
    Endpoint("ml.put_trained_model_vocabulary", "PUT", (_MODEL + "/vocabulary",),
             "cluster:admin/xpack/ml/trained_models/vocabulary/put", "admin",
             "Upload the vocabulary of a model whose task tokenizes text.",
             (Param("vocabulary", "array", BODY, None, "The tokens, in id order.", required=True),
              Param("merges", "array", BODY, None, "BPE merges (not supported: WordPiece only)."),
              Param("scores", "array", BODY, None, "Unigram scores (not supported: WordPiece only)."))),
    Endpoint("ml.get_trained_models", "GET", (_MODEL, "/_ml/trained_models"),
             "cluster:monitor/xpack/ml/inference/get", "infer",
             "Model configurations: one id, a comma-separated list, wildcards, `_all` or none.",
             (_ALLOW_NO_MATCH, *_PAGE,
              Param("decompress_definition", "boolean", QUERY, True, "Accepted; no definition is returned."),
              Param("exclude_generated", "boolean", QUERY, False, "Accepted; no effect."))),
    Endpoint("ml.delete_trained_model", "DELETE", (_MODEL,), "cluster:admin/xpack/ml/inference/delete",
             "admin", "Delete a model (409 while deployed, unless `force`: its deployments stop first).",
             (Param("force", "boolean", QUERY, False, "Stop the model's deployments first."),
              Param("timeout", "time", QUERY, "30s", "Accepted; the answer comes when it is done."))),
    Endpoint("ml.start_trained_model_deployment", "POST", (_MODEL + "/deployment/_start",),
             "cluster:admin/xpack/ml/trained_models/deployment/start", "admin",
             "Start a deployment of a model.",
             (Param("deployment_id", "string", BOTH, None, "Defaults to the model id."),
              Param("number_of_allocations", "integer", BOTH, None, "Defaults to 1."),
              Param("threads_per_allocation", "integer", BOTH, 1, "A power of 2, at most 32."),
              Param("queue_capacity", "integer", BOTH, 1024, "At most 1,000,000; per node."),
              Param("priority", "string", BOTH, "normal", "`normal` or `low`."),
              Param("cache_size", "bytes", BOTH, None, "Defaults to the model's size; `0b` disables."),
              Param("timeout", "time", BOTH, "30s", "How long to wait for `wait_for`."),
              Param("wait_for", "string", BOTH, "started", "`starting`, `started` or `fully_allocated`."),
              _ADAPTIVE,
              Param("max_batch_size", "integer", BOTH, None, "mlfleet: batch up to this many requests."),
              Param("max_batch_delay", "time", BOTH, None, "mlfleet: wait this long to fill a batch."))),
    Endpoint("ml.update_trained_model_deployment", "POST", (_MODEL + "/deployment/_update",),
             "cluster:admin/xpack/ml/trained_models/deployment/update", "admin",
             "Change a deployment's allocations (the path names the deployment).",
             (Param("number_of_allocations", "integer", BOTH, None, "The new number."), _ADAPTIVE)),
    Endpoint("ml.stop_trained_model_deployment", "POST", (_MODEL + "/deployment/_stop",),
             "cluster:admin/xpack/ml/trained_models/deployment/stop", "admin",
             "Stop a deployment (the path names the deployment).",
             (Param("allow_no_match", "boolean", BOTH, True,
                    "An unknown id answers `stopped` (true) or 404."),
              Param("force", "boolean", BOTH, False, "Stop even if in use."),
              Param("finish_pending_work", "boolean", BOTH, False, "Run the queued requests first."))),
    Endpoint("ml.clear_trained_model_deployment_cache", "POST", (_MODEL + "/deployment/cache/_clear",),
             "cluster:admin/xpack/ml/trained_models/cache/clear", "admin",
             "Clear a deployment's inference cache on every node."),
    Endpoint("ml.get_trained_models_stats", "GET", (_MODEL + "/_stats", "/_ml/trained_models/_stats"),
             "cluster:monitor/xpack/ml/inference/stats/get", "infer",
             "Deployment statistics: one entry per deployment; ids as for get.",
             (_ALLOW_NO_MATCH, *_PAGE)),
    Endpoint("ml.infer_trained_model", "POST", (_MODEL + "/_infer", _MODEL + "/deployment/_infer"),
             "cluster:monitor/xpack/ml/trained_models/deployment/infer", "infer",
             "Run documents through a deployment (or the model's deployment), straight on an agent.",
             (Param("timeout", "time", QUERY, "10s", "How long the request may queue and run."),
              Param("docs", "array", BODY, None, "The documents: `[{\"text_field\": \"...\"}]` or "
                    "`[{\"input\": [[...]]}]`.", required=True),
              Param("inference_config", "object", BODY, None, "Per-request task settings."))),
)

# Elasticsearch's parameters of every request.
COMMON_QUERY = frozenset({"pretty", "human", "error_trace", "format"})


def _format(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)


def _query_value(p: Param, raw: str) -> Any:
    if p.kind == "integer":
        try:
            return int(raw)
        except ValueError:
            raise illegal(f"Failed to parse int parameter [{p.name}] with value [{raw}]") from None
    if p.kind == "boolean":
        return parse_boolean(raw, p.name)
    if p.kind in ("object", "array"):
        raise illegal(f"[{p.name}] can only be set in the body")
    return raw


def parse_boolean(raw: str, name: str) -> bool:
    """A query-string flag: ``?force`` alone is true (Elasticsearch's RestRequest.paramAsBoolean
    treats the empty string as true)."""
    if raw in ("", "true"):
        return True
    if raw == "false":
        return False
    raise illegal(f"Failed to parse value [{raw}] as only [true] or [false] are allowed.")


_KINDS = {"string": (str,), "time": (str, int), "bytes": (str, int), "object": (dict,), "array": (list,)}


def _body_value(ep: Endpoint, p: Param, v: Any) -> Any:
    if v is None:
        return None
    if p.kind == "integer":
        if isinstance(v, str):  # Elasticsearch's parsers take numbers written as strings
            try:
                return int(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise parse_error(f"[{ep.parser}] failed to parse field [{p.name}]: [{_format(v)}] "
                              "is not an integer")
        return v
    if p.kind == "boolean":
        if isinstance(v, bool):
            return v
        if isinstance(v, str):
            return parse_boolean(v, p.name)
        raise parse_error(f"[{ep.parser}] failed to parse field [{p.name}]: [{_format(v)}] is not a boolean")
    if not isinstance(v, _KINDS[p.kind]) or isinstance(v, bool):
        want = {"string": "a string", "time": "a time value", "bytes": "a byte value",
                "object": "an object", "array": "an array"}[p.kind]
        raise parse_error(f"[{ep.parser}] failed to parse field [{p.name}]: [{_format(v)}] is not {want}")
    return v


def parse_json_body(raw: bytes) -> Optional[dict[str, Any]]:
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"[{e.lineno}:{e.colno}] " if isinstance(e, json.JSONDecodeError) else ""
        raise parse_error(f"{where}request body is not valid JSON: {e}") from None
    except RecursionError:
        raise parse_error(f"request body nests too deeply: JSON arrays and objects may nest at most "
                          f"about {sys.getrecursionlimit() // 2} levels") from None
    except ValueError as e:  # an integer literal past the interpreter's digit limit
        raise parse_error(f"request body holds a number of more than {sys.get_int_max_str_digits()} "
                          f"digits, the most a number may have: {e}") from None
    if isinstance(body, str) and body.lstrip().startswith("{"):
        # a JSON string holding the object: what the update seed's own curl example sends
        # (--data '"{\n  \"number_of_allocations\": 4\n}"'); read it as the object it holds
        try:
            body = json.loads(body)
        except json.JSONDecodeError as e:
            raise parse_error(f"[{e.lineno}:{e.colno}] request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise parse_error("request body must be a JSON object")
    return body


def parse_params(ep: Endpoint, path: str, query: Mapping[str, str], body: Optional[dict[str, Any]]
                 ) -> dict[str, Any]:
    """The request's parameters, typed, with defaults: query string and body merged as
    Elasticsearch takes them. A parameter given in both with different values is an error."""
    by_name = {p.name: p for p in ep.params}
    unknown = sorted(k for k in query if k not in COMMON_QUERY and (
        k not in by_name or by_name[k].where == BODY))
    if unknown:
        names = ", ".join(f"[{k}]" for k in unknown)
        raise illegal(f"request [{path}] contains unrecognized parameter{'s' if len(unknown) > 1 else ''}: "
                      f"{names}")
    if body is not None and not any(p.where != QUERY for p in ep.params):
        raise parse_error(f"request [{ep.method} {path}] does not support having a body")
    for k in (body or {}):
        if k not in by_name or by_name[k].where == QUERY:
            raise parse_error(f"[{ep.parser}] unknown field [{k}]")
    out: dict[str, Any] = {}
    for p in ep.params:
        q = _query_value(p, query[p.name]) if p.name in query else None
        b = _body_value(ep, p, body[p.name]) if body is not None and p.name in body else None
        if q is not None and b is not None and q != b:
            raise illegal(f"[{p.name}] is set in the query string [{_format(q)}] and in the body "
                          f"[{_format(b)}]; set it once")
        v = q if q is not None else b
        if v is None and p.required:
            where = "request body" if p.where == BODY else "request"
            raise EsError(400, "action_request_validation_exception",
                          f"Validation Failed: 1: [{p.name}] is required in the {where};")
        out[p.name] = p.default if v is None else v
    return out


def wants_pretty(query: Mapping[str, str]) -> bool:
    return "pretty" in query and query["pretty"] != "false"

"""The gateway daemon: Elasticsearch's trained-model REST API over HTTP, on aiohttp, in front of
an ``AsyncClient``. Stateless but for uploads in progress (``upload.py``): run as many as you
like. Admin calls go to the coordinator; inference goes straight to an agent through the
deployment's routing table, as ``Client.infer`` does.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from mlfleet.common.aclient import AsyncClient
from mlfleet.common.errors import ApiError, NotFound
from mlfleet.common.protocol import to_jsonable
from mlfleet.common.zmqutil import is_loopback
from mlfleet.gateway import esapi
from mlfleet.gateway.esapi import ENDPOINTS, Endpoint, EsError, illegal, parse_error
from mlfleet.gateway.keys import ApiKeys, forbidden

log = logging.getLogger("mlfleet.gateway")

OPENAPI_PATH = "/_mlfleet/openapi.json"
JSON = "application/json"
PRODUCT = {"X-Elastic-Product": "Elasticsearch"}  # Elasticsearch's clients check for it
VERSION = "8.15.0"  # the Elasticsearch API version whose trained-model endpoints this serves


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "http://127.0.0.1:9200"
    coordinator: str = "tcp://127.0.0.1:7600"
    api_keys: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    ready_file: Optional[str] = None
    request_timeout_s: float = 30.0
    max_body_bytes: int = 64 << 20


def listen_address(listen: str) -> tuple[str, str, int]:
    """``http://HOST:PORT`` or ``https://HOST:PORT`` -> (scheme, host, port); ValueError otherwise."""
    u = urlsplit(listen)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError(f"--listen must be http://HOST:PORT or https://HOST:PORT, got [{listen}]")
    try:
        port = u.port if u.port is not None else (443 if u.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"--listen has a bad port: [{listen}]") from None
    return u.scheme, u.hostname, port


def check_security(config: GatewayConfig) -> None:
    """Off loopback the gateway serves only HTTPS and only to API keys; https:// needs a cert."""
    scheme, host, _ = listen_address(config.listen)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if scheme == "https" and not config.tls_cert:
        raise ValueError(f"{config.listen} is https: pass --tls-cert and --tls-key")
    if scheme == "http" and config.tls_cert:
        raise ValueError(f"--tls-cert given: listen on https://{host}:..., not http://")
    if not is_loopback(f"tcp://{host}:0") and not (config.tls_cert and config.api_keys):
        raise ValueError(
            f"refusing to listen on {config.listen} without TLS and API keys: off loopback every "
            "request must be encrypted and authenticated. Pass --tls-cert and --tls-key (listening on "
            "https://) and --api-keys FILE (create keys with `mlfleet keys api-key NAME --role "
            "admin|infer --keys-file FILE`).")


# ---- request documents ----------------------------------------------------------------------------

def _array(v: Any, where: str) -> np.ndarray:
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as e:
        raise parse_error(f"[{where}] is not a rectangular array of numbers: {e}") from None
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.dtype.kind not in "biuf":
        raise parse_error(f"[{where}] must be numbers (nested lists), got dtype [{a.dtype}]")
    return a


def docs_from_json(docs: list[Any]) -> list[dict[str, Any]]:
    """JSON documents for the wire: ``input``/``inputs`` nested lists become arrays (float32 for
    floats); text fields stay as they are."""
    out = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise parse_error(f"[docs] must be an array of objects; [docs.{i}] is not an object")
        d = dict(d)
        if "input" in d:
            d["input"] = _array(d["input"], f"docs.{i}.input")
        if isinstance(d.get("inputs"), list):
            d["inputs"] = [_array(x, f"docs.{i}.inputs.{j}") for j, x in enumerate(d["inputs"])]
        out.append(d)
    return out


def _ids(raw: Optional[str]) -> list[str]:
    return [s.strip() for s in (raw or "_all").split(",") if s.strip()]


def _wild(ids: list[str]) -> bool:
    return any(i in ("_all", "*") or "*" in i for i in ids)


def _matches(ids: list[str], *names: str) -> bool:
    return any(i in ("_all", "*") or fnmatch.fnmatchcase(n, i) for i in ids for n in names)


def _page(items: list[Any], params: dict[str, Any]) -> list[Any]:
    start, size = params["from"], params["size"]
    if start < 0:
        raise illegal("[from] parameter cannot be negative")
    if size < 0:
        raise illegal("[size] parameter cannot be negative")
    return items[start:start + size]


# ---- the daemon -------------------------------------------------------------------------------------

Handler = Callable[["Gateway", dict[str, str], dict[str, Any]], Awaitable[dict[str, Any]]]
HANDLERS: dict[str, Handler] = {}


def handles(api: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[api] = fn
        return fn
    return register


class Gateway:
    def __init__(self, config: GatewayConfig, client: Optional[AsyncClient] = None) -> None:
        from mlfleet.gateway.upload import Uploads
        check_security(config)
        self.config = config
        self.keys = ApiKeys(config.api_keys) if config.api_keys else None
        self.client = client or AsyncClient(config.coordinator, request_timeout=config.request_timeout_s)
        self.uploads = Uploads(self.client)
        self.app = web.Application(client_max_size=config.max_body_bytes,
                                   middlewares=[self._errors])
        self.app.router.add_get("/", self._root)
        self.app.router.add_get(OPENAPI_PATH, self._openapi)
        # literal paths first: /_ml/trained_models/_stats before /_ml/trained_models/{model_id}
        routes = [(ep, path) for ep in ENDPOINTS for path in ep.paths]
        routes.sort(key=lambda r: r[1].count("{"))
        for ep, path in routes:
            self.app.router.add_route(ep.method, path, self._endpoint(ep))

    # ---- plumbing ----------------------------------------------------------------------------
    @staticmethod
    def _json(request: web.Request, body: Any, status: int = 200,
              headers: Optional[dict[str, str]] = None) -> web.Response:
        pretty = esapi.wants_pretty(request.query)
        text = json.dumps(body, indent=2 if pretty else None, separators=None if pretty else (",", ":"))
        return web.Response(body=text.encode() + (b"\n" if pretty else b""), status=status,
                            content_type=JSON, headers={**PRODUCT, **(headers or {})})

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except EsError as e:
            return self._json(request, e.body(), e.status, e.headers)
        except ApiError as e:
            status, body, headers = esapi.from_api_error(e)
            return self._json(request, body, status, headers)
        except web.HTTPMethodNotAllowed as e:
            allowed = ",".join(sorted(e.allowed_methods))
            return self._json(request, esapi.error_body(
                405, "method_not_allowed", f"Incorrect HTTP method for uri [{request.path}] and method "
                f"[{request.method}], allowed: [{allowed}]"), 405, {"Allow": allowed})
        except web.HTTPNotFound:
            return self._json(request, esapi.error_body(
                400, "illegal_argument_exception",
                f"no handler found for uri [{request.path}] and method [{request.method}]"), 400)
        except web.HTTPRequestEntityTooLarge:
            return self._json(request, esapi.error_body(
                413, "content_too_long_exception", f"request body is larger than "
                f"[{self.config.max_body_bytes}] bytes"), 413)
        except Exception:  # a bug of ours: the daemon goes on, the caller learns it failed
            log.exception("%s %s failed", request.method, request.path)
            return self._json(request, esapi.error_body(500, "exception", "internal error in the "
                                                        "gateway; see its log"), 500)

    async def _root(self, request: web.Request) -> web.Response:
        self._authorize(request, None)
        return self._json(request, {"name": "mlfleet-gateway", "cluster_name": "mlfleet",
                                    "version": {"number": VERSION, "build_flavor": "mlfleet"},
                                    "tagline": "You Know, for Search"})

    async def _openapi(self, request: web.Request) -> web.Response:
        from mlfleet.gateway.openapi import openapi
        return self._json(request, openapi())

    def _authorize(self, request: web.Request, ep: Optional[Endpoint]) -> None:
        if self.keys is None:
            return
        key = self.keys.authenticate(request.headers.get("Authorization"), request.path)
        if ep is not None and ep.role == "admin" and key.role != "admin":
            raise forbidden(ep.action, key)

    def _endpoint(self, ep: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
        handler = HANDLERS[ep.api]

        async def serve(request: web.Request) -> web.Response:
            self._authorize(request, ep)
            raw = await request.read()
            body = None
            if raw.strip():
                ctype = request.content_type
                if ctype not in (JSON, "application/x-ndjson", "application/vnd.elasticsearch+json"):
                    raise EsError(406, "media_type_header_exception",
                                  f"Content-Type header [{request.headers.get('Content-Type', '')}] "
                                  "is not supported")
                body = esapi.parse_json_body(raw)
            params = esapi.parse_params(ep, request.path, request.query, body)
            return self._json(request, await handler(self, dict(request.match_info), params))
        return serve

    # ---- running -----------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind and serve; returns the endpoint (with the port the OS chose for port 0)."""
        scheme, host, port = listen_address(self.config.listen)
        ctx = None
        if self.config.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ctx, reuse_address=True)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.endpoint = f"{scheme}://{shown}:{bound[1]}"
        return self.endpoint

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.client.close()


async def serve(config: GatewayConfig) -> None:
    from mlfleet.common.proc import sd_notify, watchdog_interval_s, write_ready_file
    gw = Gateway(config)
    endpoint = await gw.start()
    log.info("gateway serving %s for coordinator %s (%s)", endpoint, config.coordinator,
             "API keys required" if gw.keys else "no API keys: loopback only")
    if config.ready_file:
        write_ready_file(config.ready_file, endpoint)
    sd_notify("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wd = watchdog_interval_s()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), wd or 3600.0)
            except TimeoutError:
                sd_notify("WATCHDOG=1")
    finally:
        sd_notify("STOPPING=1")
        await gw.stop()
        log.info("gateway stopped")


def run(config: GatewayConfig) -> None:
    try:
        import uvloop
        uvloop.run(serve(config))
    except ImportError:
        asyncio.run(serve(config))


# ---- the endpoints ------------------------------------------------------------------------------

async def _select(raw_ids: Optional[str], fetch: Callable[[Optional[str]], Awaitable[list[dict]]],
                  names: Callable[[dict], tuple[str, ...]], allow_no_match: bool,
                  not_found: str) -> list[dict]:
    """Entries for one id, a comma-separated list, wildcards or ``_all``, as Elasticsearch
    selects them: one plain id goes to the coordinator as it is; an exact id in a list that
    matches nothing is a 404; so is a wildcard matching nothing with ``allow_no_match=false``."""
    ids = _ids(raw_ids)
    if len(ids) == 1 and not _wild(ids):
        return await fetch(ids[0])
    entries = [e for e in await fetch(None) if _matches(ids, *names(e))]
    missing = [i for i in ids if not _wild([i]) and not any(i in names(e) for e in entries)]
    if missing or (not entries and not allow_no_match):
        raise NotFound(f"{not_found} [{','.join(missing or ids)}]")
    return entries


@handles("ml.get_trained_models")
async def _get_models(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    async def fetch(model_id: Optional[str]) -> list[dict]:
        """Stored models, and this gateway's uploads in progress (``fully_defined: false``)."""
        pending = {m: up.config_body for m, up in gw.uploads.current().items()}
        if model_id is not None and model_id in pending:
            return [pending[model_id]]
        stored = (await gw.client.get_models(model_id))["trained_model_configs"]
        if model_id is None:
            stored = sorted(stored + list(pending.values()), key=lambda c: c["model_id"])
        return stored
    configs = await _select(path.get("model_id"), fetch, lambda c: (c["model_id"],), p["allow_no_match"],
                            "Could not find trained model")
    return {"count": len(configs), "trained_model_configs": _page(configs, p)}


def _model_entry(config: dict[str, Any]) -> dict[str, Any]:
    """A model with no deployment, as Elasticsearch lists it in _stats: no deployment_stats."""
    from mlfleet.coordinator.planner import memory_estimate
    size = config["model_size_bytes"]
    return {"model_id": config["model_id"], "pipeline_count": 0,
            "model_size_stats": {"model_size_bytes": size,
                                 "required_native_memory_bytes": memory_estimate(size, size)}}


@handles("ml.get_trained_models_stats")
async def _get_stats(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    async def fetch(one: Optional[str]) -> list[dict]:
        """One entry per deployment, and one per model that has none (as Elasticsearch lists)."""
        try:
            entries = (await gw.client.get_stats(one))["trained_model_stats"]
        except NotFound as missing:
            try:
                configs = (await gw.client.get_models(one))["trained_model_configs"]
            except NotFound:
                raise missing from None
            return [_model_entry(c) for c in configs]
        if one is None:
            deployed = {e["model_id"] for e in entries}
            configs = (await gw.client.get_models())["trained_model_configs"]
            entries += [_model_entry(c) for c in configs if c["model_id"] not in deployed]
        return sorted(entries, key=_stats_names)
    entries = await _select(path.get("model_id"), fetch, _stats_names, p["allow_no_match"],
                            "No known model deployment with id")
    return {"count": len({e["model_id"] for e in entries}), "trained_model_stats": _page(entries, p)}


def _stats_names(e: dict[str, Any]) -> tuple[str, str]:
    return e["model_id"], e.get("deployment_stats", {}).get("deployment_id", e["model_id"])


@handles("ml.delete_trained_model")
async def _delete_model(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    model_id = path["model_id"]
    storing = gw.uploads.current().get(model_id)
    if storing is not None and storing.storing:
        # acknowledging would be a lie: the store under way creates the model anyway
        raise EsError(409, "status_exception",
                      f"Cannot delete model [{model_id}]: its definition is being stored (its upload is "
                      "complete); delete it once the request putting its last part has been answered")
    if gw.uploads.discard(model_id):
        return {"acknowledged": True}
    if p["force"]:
        try:
            entries = (await gw.client.get_stats(model_id))["trained_model_stats"]
        except NotFound:
            entries = []
        for e in entries:
            if e["model_id"] == model_id:
                await gw.client.stop_deployment(e["deployment_stats"]["deployment_id"], force=True)
    return await gw.client.delete_model(model_id)


@handles("ml.start_trained_model_deployment")
async def _start(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    return await gw.client.start_deployment(path["model_id"], **p)


@handles("ml.update_trained_model_deployment")
async def _update(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    return await gw.client.update_deployment(path["model_id"], **p)


@handles("ml.stop_trained_model_deployment")
async def _stop(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    return await gw.client.stop_deployment(path["model_id"], **p)


@handles("ml.clear_trained_model_deployment_cache")
async def _clear(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    return await gw.client.clear_cache(path["model_id"])


@handles("ml.infer_trained_model")
async def _infer(gw: Gateway, path: dict[str, str], p: dict[str, Any]) -> dict[str, Any]:
    cfg = p["inference_config"] or None  # Elasticsearch's form, {"<task>": {...}}: the task checks it
    if not p["docs"]:
        raise EsError(400, "action_request_validation_exception",
                      "Validation Failed: 1: at least one document is required;")
    docs = docs_from_json(p["docs"])
    try:
        from mlfleet.common.units import parse_time
        parse_time(p["timeout"], "timeout")
    except ValueError as e:
        raise illegal(str(e)) from None
    target = path["model_id"]
    try:
        out = await gw.client.infer(target, docs, p["timeout"], cfg, decode=False)
    except NotFound:
        # a model id whose deployments have other ids: Elasticsearch uses one of them
        deployment = await _deployment_of(gw, target)
        if deployment is None:
            raise
        out = await gw.client.infer(deployment, docs, p["timeout"], cfg, decode=False)
    return {"inference_results": to_jsonable(out.get("inference_results", []))}


async def _deployment_of(gw: Gateway, model_id: str) -> Optional[str]:
    try:
        entries = (await gw.client.get_stats(model_id))["trained_model_stats"]
    except NotFound:
        return None
    for e in entries:
        if e["model_id"] == model_id and e["deployment_stats"]["deployment_id"] != model_id:
            return e["deployment_stats"]["deployment_id"]
    return None


import mlfleet.gateway.upload  # noqa: E402,F401  (registers the upload endpoints' handlers)

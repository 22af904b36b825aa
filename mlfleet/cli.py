"""The ``mlfleet`` command: the daemons (``up``, ``coordinator``, ``agent``) and the admin CLI.

With ``--format json`` (the default when stdout is not a terminal) stdout holds exactly the
response body; on an error stdout is empty, the error body is the last line on stderr and the
exit code is 1 (the server answered with an error) or 3 (no answer).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from mlfleet.common.errors import ApiError, NoAnswer

DEFAULT_COORDINATOR = "tcp://127.0.0.1:7600"

# Every option can come from a flag, an MLFLEET_<COMMAND>_<OPTION> variable (e.g.
# MLFLEET_COORDINATOR_NODE_TIMEOUT=5s) or a TOML file (--config / MLFLEET_CONFIG) with a table
# per command; a flag beats a variable, which beats the file, which beats the default.
app = typer.Typer(help="mlfleet: deploy TorchScript models across hosts and serve inference.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"auto_envvar_prefix": "MLFLEET"})
_DRY_RUN = {"on": False}
models_app = typer.Typer(help="Store, list and delete model definitions.", no_args_is_help=True)
deployments_app = typer.Typer(help="Start, update, stop and inspect deployments.", no_args_is_help=True)
nodes_app = typer.Typer(help="Inspect the agents of the cluster.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(deployments_app, name="deployments")
app.add_typer(nodes_app, name="nodes")
keys_app = typer.Typer(help="CURVE key pairs for running off loopback.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _load_config_file(path: Path) -> dict[str, Any]:
    import tomllib
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise typer.BadParameter(f"--config {path}: {e}") from None

    def norm(d: Any) -> Any:
        return {k.replace("-", "_"): norm(v) for k, v in d.items()} if isinstance(d, dict) else d
    unknown = _unknown_config_keys(typer.main.get_command(app), data)
    if unknown:
        raise typer.BadParameter(f"--config {path}: unknown {', '.join(unknown)} (each table names a "
                                 "command, each key one of its options, as `mlfleet COMMAND --help` "
                                 "lists them)")
    return norm(data)


def _unknown_config_keys(cmd: Any, table: dict[str, Any], where: str = "") -> list[str]:
    """The keys and tables of a --config file that name no command or option (a typo would
    otherwise be ignored without a word)."""
    params = {p.name for p in cmd.params if p.name}
    subs = getattr(cmd, "commands", {})  # a group's subcommands
    out = []
    for key, value in table.items():
        name = key.replace("-", "_")
        if key in subs and isinstance(value, dict):
            out += _unknown_config_keys(subs[key], value, f"{where}{key}.")
        elif name not in params:
            out.append(f"{'key' if where else 'key or table'} [{where}{key}]")
    return out


@app.callback()
def _root(ctx: typer.Context,
          config: Optional[Path] = typer.Option(None, "--config", envvar="MLFLEET_CONFIG", exists=True,
                                                dir_okay=False, help="TOML file: a table per command, e.g. [coordinator] listen = \"tcp://...\"."),
          secret_key: Optional[Path] = typer.Option(None, "--secret-key", envvar="MLFLEET_SECRET_KEY",
                                                    help="This client's CURVE secret key file (NAME.key)."),
          coordinator_key: Optional[Path] = typer.Option(None, "--coordinator-key", envvar="MLFLEET_COORDINATOR_KEY",
                                                         help="The coordinator's public key file (NAME.pub).")) -> None:
    """mlfleet: deploy TorchScript models across hosts and serve inference."""
    if config is not None:
        ctx.default_map = _load_config_file(config)
    if secret_key:
        os.environ["MLFLEET_SECRET_KEY"] = str(secret_key)
    if coordinator_key:
        os.environ["MLFLEET_COORDINATOR_KEY"] = str(coordinator_key)


@keys_app.command("generate")
def keys_generate(name: str, out: Path = typer.Option(..., "--out", help="Directory for NAME.key and NAME.pub.")) -> None:
    """Create a CURVE key pair: NAME.key (secret, mode 600) and NAME.pub.

    Example: mlfleet keys generate coordinator --out /etc/mlfleet/keys
    """
    from mlfleet.common.security import KEY_NAME_RULE, generate_keys, load_public, valid_key_name
    if not valid_key_name(name):
        raise typer.BadParameter(f"[{name}] must be {KEY_NAME_RULE}", param_hint="NAME")
    try:
        secret, public = generate_keys(name, out)
    except (FileExistsError, OSError) as e:
        sys.stderr.write(f"mlfleet: {e}\n")
        raise typer.Exit(2) from None
    sys.stdout.write(json.dumps({"secret_key": str(secret), "public_key": str(public),
                                 "z85": load_public(public).decode()}) + "\n")


@keys_app.command("api-key")
def keys_api_key(name: str,
                 role: str = typer.Option(..., "--role", help="admin (everything) or infer (inference and reads)."),
                 keys_file: Path = typer.Option(..., "--keys-file", help="The gateway's --api-keys file (created, mode 600)."),
                 ) -> None:
    """Create an API key for the HTTP gateway; prints it once, as Elasticsearch's create-API-key
    answer (send it as 'Authorization: ApiKey <encoded>'). The file keeps only its hash.

    Example: mlfleet keys api-key ops --role admin --keys-file /etc/mlfleet/api_keys
    """
    from mlfleet.gateway.keys import create_api_key
    try:
        out = create_api_key(keys_file, name, role)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"mlfleet: {e}\n")
        raise typer.Exit(2) from None
    sys.stdout.write(json.dumps(out) + "\n")


class Format(str, Enum):
    json = "json"
    table = "table"


CoordOpt = typer.Option(None, "--coordinator", envvar="MLFLEET_COORDINATOR",
                        help="Coordinator address (default tcp://127.0.0.1:7600).")
FormatOpt = typer.Option(None, "--format", help="json or table (json when stdout is not a terminal).")


def _setup_logging() -> None:
    """One line per event on stderr. Under systemd (JOURNAL_STREAM set) journald stamps the time
    itself, so the line starts with the level."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=os.environ.get("MLFLEET_LOG_LEVEL", "INFO"), format=fmt, stream=sys.stderr)


_ANSWERED = {"any": False}  # whether a server has answered this command's client


def _client(coordinator: Optional[str]):
    """The admin client; a key file it cannot use is a usage error naming where it came from."""
    from mlfleet.common.client import Client

    class CliClient(Client):
        def _send(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            rep = super()._send(*args, **kwargs)
            _ANSWERED["any"] = True
            return rep

    try:
        return CliClient(coordinator or DEFAULT_COORDINATOR)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"mlfleet: {_key_error(e)}\n")
        raise typer.Exit(2) from None


def _key_error(e: Exception) -> str:
    """A client key problem, naming the option (and variable) it came from and the rule."""
    from mlfleet.common.security import load_secret
    secret = os.environ.get("MLFLEET_SECRET_KEY", "")
    public = os.environ.get("MLFLEET_COORDINATOR_KEY", "")
    if not (secret and public):
        return f"{e} (options --secret-key and --coordinator-key)"
    try:
        load_secret(secret)
        opt, var, path, rule = "--coordinator-key", "MLFLEET_COORDINATOR_KEY", public, "NAME.pub"
    except (OSError, ValueError):
        opt, var, path, rule = "--secret-key", "MLFLEET_SECRET_KEY", secret, "NAME.key, mode 600"
    return (f"{opt} / {var} [{path}]: {e}; it must be a CURVE key file ({rule}), its path absolute "
            "or relative to the working directory")


def _rows(body: dict[str, Any]) -> tuple[str, list[str], list[dict[str, Any]]] | None:
    """The table view of a response body: (title, columns, rows), or None to show JSON."""
    if "nodes" in body and isinstance(body["nodes"], dict):
        return "Nodes", ["node", "hostname", "address", "processors", "memory GB", "deployments"], [
            {"node": k, "hostname": v["hostname"], "address": v["transport_address"],
             "processors": v["allocated_processors"], "memory GB": f'{v["memory"]["total_bytes"] / 2**30:.1f}',
             "deployments": ",".join(v["deployments"])} for k, v in body["nodes"].items()]
    if "trained_model_stats" in body:
        rows = []
        for e in body["trained_model_stats"]:
            d = e["deployment_stats"]
            a = d["allocation_status"]
            for n in d["nodes"] or [{}]:
                node = next(iter(n.get("node", {"-": 0})))
                rows.append({"deployment": d["deployment_id"], "model": d["model_id"], "state": d["state"],
                             "node": node, "route": n.get("routing_state", {}).get("routing_state", "-"),
                             "allocations": f'{n.get("number_of_allocations", 0)} ({a["allocation_count"]}/{a["target_allocation_count"]})',
                             "inferences": n.get("inference_count", 0), "errors": n.get("error_count", 0),
                             "pending": n.get("number_of_pending_requests", 0),
                             "avg ms": f'{n.get("average_inference_time_ms", 0.0):.2f}',
                             "cache hits": n.get("inference_cache_hit_count", 0)})
        return "Deployments", ["deployment", "model", "state", "node", "route", "allocations",
                               "inferences", "errors", "pending", "avg ms", "cache hits"], rows
    if "trained_model_configs" in body:
        return "Models", ["model", "task", "bytes", "sha256"], [
            {"model": c["model_id"], "task": c["task"], "bytes": c["model_size_bytes"],
             "sha256": c["sha256"][:12]} for c in body["trained_model_configs"]]
    if "assignment" in body:
        a = body["assignment"]
        return (f'Deployment {a["task_parameters"]["deployment_id"]}: {a["assignment_state"]}',
                ["node", "routing state", "current", "target", "reason"],
                [{"node": k, "routing state": r["routing_state"], "current": r["current_allocations"],
                  "target": r["target_allocations"], "reason": r["reason"]} for k, r in a["routing_table"].items()])
    return None


def _rich_table(body: dict[str, Any]):
    from rich.table import Table
    view = _rows(body)
    if view is None:
        return None
    title, columns, rows = view
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in ("processors", "memory GB", "inferences", "errors",
                                                  "pending", "avg ms", "cache hits", "bytes", "current",
                                                  "target") else "left")
    for r in rows:
        t.add_row(*(str(r.get(c, "")) for c in columns))
    return t


def _emit(body: dict[str, Any], fmt: Optional[Format]) -> None:
    from mlfleet.common.protocol import to_jsonable
    body = to_jsonable(body)
    use = fmt or (Format.table if sys.stdout.isatty() else Format.json)
    table = _rich_table(body) if use == Format.table else None
    if table is None:
        sys.stdout.write(json.dumps(body, indent=2 if use == Format.table else None) + "\n")
    else:
        from rich.console import Console
        Console(width=None if sys.stdout.isatty() else 200).print(table)


def _run(fmt: Optional[Format], fn) -> None:
    try:
        body = fn()
    except NoAnswer as e:
        sys.stderr.write(json.dumps(e.to_body()) + "\n")
        raise typer.Exit(3) from None
    except ApiError as e:
        from mlfleet.common.errors import BadRequest
        if isinstance(e, BadRequest) and not _ANSWERED["any"]:  # refused here, before sending
            sys.stderr.write(f"mlfleet: {e.to_body()['error']['reason']}\n")
            raise typer.Exit(2) from None
        sys.stderr.write(json.dumps(e.to_body()) + "\n")
        raise typer.Exit(1) from None
    _emit(body, fmt)


# ---- daemons -------------------------------------------------------------------------------------

@app.command()
def coordinator(
    listen: str = typer.Option(DEFAULT_COORDINATOR, help="Address to bind (port 0: the OS picks)."),
    data_dir: Path = typer.Option(Path("./mlfleet-data/coordinator"), help="State and model files."),
    ready_file: Optional[Path] = typer.Option(None, help="Written as JSON {endpoint, pid} once serving."),
    heartbeat_interval: str = typer.Option("1s", help="How often agents report."),
    node_timeout: str = typer.Option("10s", help="A node silent this long is lost."),
    adaptive_interval: str = typer.Option("10s", help="Adaptive allocations tick."),
    scale_up_cooldown: str = typer.Option("5m", help="No scale-down this long after a scale-up."),
    scale_to_zero_after: str = typer.Option("15m", help="Idle time before scaling to zero (min 0)."),
    warm_zero_keep: str = typer.Option("5m", help="How long a deployment scaled to zero keeps its weights loaded (0s: not at all)."),
    bulk_max_bytes_per_sec: str = typer.Option(
        "0b", help="Model bytes sent to agents per second, all fetches together (0b: no cap). Heartbeats "
                   "go first either way; a cap keeps a wide fetch from taking the coordinator's CPU."),
    curve_secret_key: Optional[Path] = typer.Option(None, exists=True, help="CURVE secret key: enforces CURVE on every address."),
    authorized_keys: Optional[Path] = typer.Option(None, exists=True, help="Lines 'ROLE Z85_PUBLIC_KEY', roles admin, infer, agent."),
    metrics_listen: Optional[str] = typer.Option(None, help="[HOST:]PORT for the Prometheus endpoint (loopback unless a host is given; port 0: the OS picks)."),
    metrics_tls_cert: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS certificate for the metrics endpoint (required off loopback)."),
    metrics_tls_key: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS private key for the metrics endpoint."),
    metrics_basic_auth: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="File of 'user:password' lines for the metrics endpoint (mode 600; required off loopback)."),
) -> None:
    """Run the coordinator daemon.

    Example: mlfleet coordinator --listen tcp://127.0.0.1:7600 --data-dir /var/lib/mlfleet
    """
    from mlfleet.common.zmqutil import is_loopback
    from mlfleet.coordinator.config import CoordinatorConfig
    from mlfleet.coordinator.server import start
    _setup_logging()
    if not is_loopback(listen) and not curve_secret_key:
        _refuse_without_keys(listen)
    if curve_secret_key and not authorized_keys:
        raise typer.BadParameter("is required with --curve-secret-key (lines 'ROLE Z85_PUBLIC_KEY')",
                                 param_hint="--authorized-keys")

    parse_time = _duration
    if parse_time(node_timeout, "node_timeout") <= parse_time(heartbeat_interval, "heartbeat_interval"):
        raise typer.BadParameter(f"must be longer than --heartbeat-interval ({heartbeat_interval}): a node "
                                 "is lost after missing heartbeats, not between two of them",
                                 param_hint="--node-timeout")
    _serve_or_exit(start, CoordinatorConfig(
        listen=listen, data_dir=str(data_dir), ready_file=_ready_file(ready_file),
        heartbeat_interval_s=parse_time(heartbeat_interval, "heartbeat_interval"),
        node_timeout_s=parse_time(node_timeout, "node_timeout"),
        adaptive_interval_s=parse_time(adaptive_interval, "adaptive_interval"),
        scale_up_cooldown_s=parse_time(scale_up_cooldown, "scale_up_cooldown", allow_zero=True),
        scale_to_zero_after_s=parse_time(scale_to_zero_after, "scale_to_zero_after"),
        warm_zero_keep_s=parse_time(warm_zero_keep, "warm_zero_keep", allow_zero=True),
        bulk_max_bytes_per_sec=_bytes_option(bulk_max_bytes_per_sec, "bulk_max_bytes_per_sec"),
        curve_secret_key=str(curve_secret_key) if curve_secret_key else None,
        authorized_keys=str(authorized_keys) if authorized_keys else None,
        metrics_listen=_metrics_listen(metrics_listen),
        **_metrics_tls(metrics_tls_cert, metrics_tls_key, metrics_basic_auth)))


def _metrics_tls(cert: Optional[Path], key: Optional[Path], auth: Optional[Path]) -> dict[str, Optional[str]]:
    return {"metrics_tls_cert": str(cert) if cert else None, "metrics_tls_key": str(key) if key else None,
            "metrics_basic_auth": str(auth) if auth else None}


def _bytes_option(value: str, name: str) -> int:
    """A byte-size option; a bad one is a usage error naming the option."""
    from mlfleet.common.units import parse_bytes
    try:
        return parse_bytes(value, name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=f"--{name.replace('_', '-')}") from None


def _duration(value: str, name: str, allow_zero: bool = False) -> float:
    """A time-value option in seconds; a bad one is a usage error naming the option."""
    import math

    from mlfleet.common.units import parse_time
    hint = f"--{name.replace('_', '-')}"
    try:
        seconds = parse_time(value, name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=hint) from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise typer.BadParameter(f"must be {'non-negative' if allow_zero else 'positive'}", param_hint=hint)
    return seconds


def _metrics_listen(value: Optional[str]) -> Optional[str]:
    """--metrics-listen [HOST:]PORT with the port in 0-65535; a bad one is a usage error."""
    if value is None:
        return None
    port = value.rpartition(":")[2]
    if not (port.isdigit() and 0 <= int(port) <= 65535):
        raise typer.BadParameter(f"[{value}] must be [HOST:]PORT with a port in 0-65535 (0: the OS picks)",
                                 param_hint="--metrics-listen")
    return value


def _ready_file(path: Optional[Path]) -> Optional[str]:
    """--ready-file: checked before start-up, so a path that cannot be written is a usage error,
    not a crash once the daemon serves."""
    if path is None:
        return None
    parent = path.parent
    if path.is_dir():
        problem = "is a directory"
    elif not parent.is_dir():
        problem = f"its directory {parent} does not exist or is not a directory"
    elif not os.access(parent, os.W_OK | os.X_OK):
        problem = f"its directory {parent} is not writable"
    else:
        return str(path)
    raise typer.BadParameter(f"[{path}] {problem}: the file is written once the daemon serves",
                             param_hint="--ready-file")


def _serve_or_exit(start, config) -> None:
    """Configuration problems found at start-up (a bad key file, a port in use) end the daemon
    with a clear message and exit code 2, which systemd's RestartPreventExitStatus=2 will not
    restart in a loop. Once the daemon serves, its loop catches every fault itself: exit code 2
    never means anything that happened after start-up."""
    import dataclasses
    import sqlite3

    import zmq
    if _DRY_RUN["on"]:  # mlfleet config show
        sys.stdout.write(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        return
    try:
        daemon = start(config)
    except (ValueError, OSError, zmq.ZMQError, sqlite3.Error) as e:  # sqlite3: a damaged state file
        sys.stderr.write(f"mlfleet: cannot start: {e}\n")
        raise typer.Exit(2) from None
    daemon.run()


def _refuse_without_keys(listen: str) -> None:
    sys.stderr.write(
        f"refusing to listen on {listen} without CURVE keys: off loopback every connection must be "
        "authenticated. Create keys with `mlfleet keys generate NAME --out DIR` and pass "
        "--curve-secret-key (and --authorized-keys on the coordinator, "
        "--coordinator-public-key on agents).\n")
    raise typer.Exit(2)


@app.command()
def agent(
    coordinator: str = typer.Option(DEFAULT_COORDINATOR, help="Coordinator address."),
    node_id: str = typer.Option(..., help="This node's unique id."),
    listen: str = typer.Option("tcp://127.0.0.1:0", help="Inference endpoint to bind (port 0: the OS picks)."),
    advertise: Optional[str] = typer.Option(None, help="Address clients are given (default: the bound one)."),
    allocated_processors: Optional[int] = typer.Option(None, min=1, max=4096, help="Processors for allocations (default: CPU count)."),
    data_dir: Optional[Path] = typer.Option(None, help="Model cache directory."),
    ready_file: Optional[Path] = typer.Option(None, help="Written as JSON {endpoint, pid} once serving."),
    curve_secret_key: Optional[Path] = typer.Option(None, exists=True, help="This agent's CURVE secret key."),
    coordinator_public_key: Optional[Path] = typer.Option(None, exists=True, help="The coordinator's public key."),
    metrics_listen: Optional[str] = typer.Option(None, help="[HOST:]PORT for the Prometheus endpoint (loopback unless a host is given; port 0: the OS picks)."),
    metrics_tls_cert: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS certificate for the metrics endpoint (required off loopback)."),
    metrics_tls_key: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS private key for the metrics endpoint."),
    metrics_basic_auth: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="File of 'user:password' lines for the metrics endpoint (mode 600; required off loopback)."),
    stop_grace: str = typer.Option("5s", help="A stopped deployment's running requests get this long; then its processes are killed."),
    overrun_grace: str = typer.Option("5s", help="A forward pass this far past its request's deadline has its worker killed and replaced."),
    queue_max_bytes: str = typer.Option("256mb", help="Bytes of inference requests held per deployment (queued or running); 429 past it."),
    load_retries: int = typer.Option(2, min=0, max=10, help="A model that fails to load is tried this many more times before its route fails."),
    load_timeout: str = typer.Option("10m", help="A model host that has not loaded its model (and run its warm-up) by then is killed; that counts as a failed try."),
    require_sandbox: bool = typer.Option(False, "--require-sandbox", help="Refuse to start where the kernel lacks Landlock or seccomp filters (models run sandboxed wherever it has them)."),
) -> None:
    """Run a node agent.

    Example: mlfleet agent --coordinator tcp://10.0.0.1:7600 --node-id gpu-host-1
    """
    from mlfleet.agent.config import AgentConfig
    from mlfleet.agent.server import start
    from mlfleet.common.zmqutil import is_loopback
    _setup_logging()
    if not is_loopback(listen) and not curve_secret_key:
        _refuse_without_keys(listen)
    from mlfleet.common.messages import NODE_ID_RE
    if not NODE_ID_RE.match(node_id):
        raise typer.BadParameter("must be 1 to 128 letters, digits, '_', '.', ':' or '-', starting "
                                 "with a letter or digit", param_hint="--node-id")
    max_bytes = _bytes_option(queue_max_bytes, "queue_max_bytes")
    _serve_or_exit(start, AgentConfig(
        coordinator=coordinator, node_id=node_id, listen=listen, advertise=advertise,
        curve_secret_key=str(curve_secret_key) if curve_secret_key else None,
        coordinator_public_key=str(coordinator_public_key) if coordinator_public_key else None,
        metrics_listen=_metrics_listen(metrics_listen), allocated_processors=allocated_processors,
        **_metrics_tls(metrics_tls_cert, metrics_tls_key, metrics_basic_auth),
        data_dir=str(data_dir) if data_dir else None, ready_file=_ready_file(ready_file),
        stop_grace_s=_duration(stop_grace, "stop_grace"),
        overrun_grace_s=_duration(overrun_grace, "overrun_grace"),
        queue_max_bytes=max_bytes, load_retries=load_retries, require_sandbox=require_sandbox,
        load_timeout_s=_duration(load_timeout, "load_timeout")))


@app.command()
def gateway(
    listen: str = typer.Option("http://127.0.0.1:9200", help="http://HOST:PORT (loopback) or https://HOST:PORT (port 0: the OS picks)."),
    coordinator: str = typer.Option(DEFAULT_COORDINATOR, help="Coordinator address."),
    api_keys: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Keys file ('mlfleet keys api-key'): every request then needs 'Authorization: ApiKey ...'."),
    tls_cert: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS certificate (PEM; required off loopback)."),
    tls_key: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="TLS private key (PEM)."),
    request_timeout: str = typer.Option("30s", help="How long an admin call waits for the coordinator."),
    ready_file: Optional[Path] = typer.Option(None, help="Written as JSON {endpoint, pid} once serving."),
) -> None:
    """Run the HTTP gateway: Elasticsearch's trained-model REST API for the cluster.

    Example: mlfleet gateway --listen http://127.0.0.1:9200 --coordinator tcp://127.0.0.1:7600
    """
    from mlfleet.gateway.server import GatewayConfig, check_security, run
    _setup_logging()
    config = GatewayConfig(listen=listen, coordinator=coordinator,
                           api_keys=str(api_keys) if api_keys else None,
                           tls_cert=str(tls_cert) if tls_cert else None,
                           tls_key=str(tls_key) if tls_key else None,
                           ready_file=str(ready_file) if ready_file else None,
                           request_timeout_s=_duration(request_timeout, "request_timeout"))
    try:
        check_security(config)
    except ValueError as e:
        sys.stderr.write(f"mlfleet: {e}\n")
        raise typer.Exit(2) from None
    if _DRY_RUN["on"]:  # mlfleet config show gateway
        import dataclasses
        sys.stdout.write(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        return
    try:
        run(config)  # binds inside its own event loop: start-up problems surface here
    except (OSError, ValueError) as e:  # a port in use, a bad certificate or keys file
        sys.stderr.write(f"mlfleet: cannot start: {e}\n")
        raise typer.Exit(2) from None


def _wait_ready(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[3]} exited with code {proc.returncode} before it was ready")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[3]} was not ready within {timeout_s:.0f}s")


@app.command()
def up(
    data_dir: Path = typer.Option(Path("./mlfleet-data"), help="Where both daemons keep their state."),
    listen: str = typer.Option(DEFAULT_COORDINATOR, help="Coordinator address (loopback)."),
    node_id: str = typer.Option("local", help="The local agent's node id."),
    allocated_processors: Optional[int] = typer.Option(None, min=1, max=4096, help="Processors for allocations."),
    ready_file: Optional[Path] = typer.Option(None, help="Written as JSON once both daemons serve."),
    gateway_listen: str = typer.Option("http://127.0.0.1:9200", help="The HTTP gateway's address (loopback); 'none': no gateway."),
) -> None:
    """The embedded default: a coordinator, one agent and the HTTP gateway on loopback. Ctrl-C
    stops them all.

    Example: mlfleet up --data-dir /tmp/mlfleet
    """
    _setup_logging()
    log = logging.getLogger("mlfleet.up")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise typer.BadParameter(f"[{data_dir}] cannot be created: {e}", param_hint="--data-dir") from None
    run = Path(tempfile.mkdtemp(prefix="mlfleet-up-"))
    exe = [sys.executable, "-m", "mlfleet"]
    procs: list[subprocess.Popen] = []
    stopping = False

    def shutdown(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    code = 0
    try:
        coord = subprocess.Popen(exe + ["coordinator", "--listen", listen, "--data-dir",
                                        str(data_dir / "coordinator"), "--ready-file", str(run / "c.json")],
                                 start_new_session=True)
        procs.append(coord)
        c = _wait_ready(run / "c.json", coord)
        args = ["agent", "--coordinator", c["endpoint"], "--node-id", node_id, "--data-dir",
                str(data_dir / f"agent-{node_id}"), "--ready-file", str(run / "a.json")]
        if allocated_processors:
            args += ["--allocated-processors", str(allocated_processors)]
        ag = subprocess.Popen(exe + args, start_new_session=True)
        procs.append(ag)
        a = _wait_ready(run / "a.json", ag)
        log.info("mlfleet is up: coordinator %s, agent [%s] %s", c["endpoint"], node_id, a["endpoint"])
        extra = {"agent": a["endpoint"]}
        if gateway_listen != "none":
            gw = subprocess.Popen(exe + ["gateway", "--listen", gateway_listen, "--coordinator", c["endpoint"],
                                         "--ready-file", str(run / "g.json")], start_new_session=True)
            try:
                extra["gateway"] = _wait_ready(run / "g.json", gw)["endpoint"]
                procs.append(gw)
                log.info("HTTP gateway (Elasticsearch's trained-model API) on %s", extra["gateway"])
            except RuntimeError as e:  # e.g. its port is taken (an Elasticsearch on 9200)
                from mlfleet.common.proc import stop_process
                stop_process(gw, grace_s=5.0)
                log.warning("running without the HTTP gateway: %s (see its error above; choose "
                            "another address with --gateway-listen, or --gateway-listen none)", e)
        if ready_file:
            from mlfleet.common.proc import write_ready_file
            write_ready_file(str(ready_file), c["endpoint"], **extra)
        while not stopping:
            if any(p.poll() is not None for p in procs):
                log.error("a daemon exited on its own; stopping the other")
                code = 1
                break
            time.sleep(0.2)
    except RuntimeError as e:
        log.error("%s", e)
        # a daemon that refused its configuration (exit 2) is ours too: systemd must not loop
        code = 2 if any(p.poll() == 2 for p in procs) else 1
    finally:
        from mlfleet.common.proc import stop_process
        for p in reversed(procs):
            stop_process(p, grace_s=10.0)
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
        log.info("mlfleet stopped")
    raise typer.Exit(code)


# ---- models ----------------------------------------------------------------------------------------

class Task(str, Enum):
    pass_through = "pass_through"
    text_embedding = "text_embedding"
    text_classification = "text_classification"
    ner = "ner"


class ModelFormat(str, Enum):
    torchscript = "torchscript"
    export = "export"


@models_app.command("put")
def models_put(model_id: str, file: Path = typer.Option(..., "--file", exists=True, dir_okay=False),
               task: Task = typer.Option(Task.pass_through),
               tokenizer: Optional[Path] = typer.Option(None, exists=True, dir_okay=False),
               example_input: Optional[Path] = typer.Option(
                   None, exists=True, dir_okay=False,
                   help="A .npy array (at most 64 KiB): the warm-up input a new allocation runs "
                        "before it takes requests (TorchScript pass_through models; exported "
                        "programs carry their own)."),
               coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """Store a model (TorchScript, a torch.export program or an AOTInductor package).

    Example: mlfleet models put my-model --file model.pt --example-input example.npy
    """
    model_config = None
    if example_input is not None:
        import numpy as np

        from mlfleet.common.protocol import encode_array
        try:
            arr = np.load(example_input, allow_pickle=False)  # a file is input: no pickles
        except (ValueError, OSError) as e:
            sys.stderr.write(f"mlfleet: --example-input [{example_input}] is not a .npy array: {e}\n")
            raise typer.Exit(2) from None
        model_config = {"example_input": encode_array(arr)}
    with _client(coordinator) as c:
        _run(format, lambda: c.put_model(model_id, file, task=task.value, tokenizer=tokenizer,
                                         model_config=model_config))


@models_app.command("import-hf")
def models_import_hf(model_id: str, path: Path = typer.Argument(..., exists=True, file_okay=False),
                     task: Optional[Task] = typer.Option(
                         None, help="Default: from config.json (ForTokenClassification: ner, "
                                    "ForSequenceClassification: text_classification, else text_embedding)."),
                     max_sequence_length: Optional[int] = typer.Option(None, help="Default: the model's own."),
                     model_format: ModelFormat = typer.Option(
                         ModelFormat.export, "--model-format",
                         help="export (a torch.export program, .pt2; the default) or torchscript "
                              "(torch.jit.trace, deprecated by PyTorch)."),
                     coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """Export a local Hugging Face model directory (torch.export) and put it (needs the hf extra).

    Example: mlfleet models import-hf ner-model ./distilbert-base-uncased-finetuned-conll03-english
    """
    from mlfleet.common.hf import import_hf

    def put():
        try:
            return import_hf(c, model_id, path, task=task.value if task else None,
                             max_sequence_length=max_sequence_length, format=model_format.value)
        except ValueError as e:
            sys.stderr.write(f"mlfleet: {e}\n")
            raise typer.Exit(2) from None

    with _client(coordinator) as c:
        _run(format, put)


@models_app.command("list")
def models_list(coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """List stored models. Example: mlfleet models list --format table"""
    with _client(coordinator) as c:
        _run(format, c.get_models)


@models_app.command("get")
def models_get(model_id: str, coordinator: Optional[str] = CoordOpt,
               format: Optional[Format] = FormatOpt) -> None:
    """Show one model. Example: mlfleet models get my-model"""
    with _client(coordinator) as c:
        _run(format, lambda: c.get_models(model_id))


@models_app.command("delete")
def models_delete(model_id: str, coordinator: Optional[str] = CoordOpt,
                  format: Optional[Format] = FormatOpt) -> None:
    """Delete a model that is not deployed. Example: mlfleet models delete my-model"""
    with _client(coordinator) as c:
        _run(format, lambda: c.delete_model(model_id))


# ---- deployments -----------------------------------------------------------------------------------

@deployments_app.command("start")
def deployments_start(
    model_id: str,
    deployment_id: Optional[str] = typer.Option(None),
    number_of_allocations: Optional[int] = typer.Option(None),
    threads_per_allocation: int = typer.Option(1),
    queue_capacity: int = typer.Option(1024),
    priority: str = typer.Option("normal"),
    cache_size: Optional[str] = typer.Option(None),
    timeout: str = typer.Option("30s"),
    wait_for: str = typer.Option("started"),
    adaptive_allocations: bool = typer.Option(False, "--adaptive-allocations"),
    min_number_of_allocations: Optional[int] = typer.Option(None),
    max_number_of_allocations: Optional[int] = typer.Option(None),
    max_batch_size: Optional[int] = typer.Option(None, help="Dynamic batching: up to N queued requests per forward pass."),
    max_batch_delay: Optional[str] = typer.Option(None, help="Wait up to this long to fill a batch."),
    coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt,
) -> None:
    """Start a deployment and wait for it (--wait-for starting|started|fully_allocated).

    Example: mlfleet deployments start my-model --number-of-allocations 2 --wait-for fully_allocated
    """
    adaptive = None
    if adaptive_allocations or min_number_of_allocations is not None or max_number_of_allocations is not None:
        adaptive = {"enabled": adaptive_allocations,
                    "min_number_of_allocations": min_number_of_allocations,
                    "max_number_of_allocations": max_number_of_allocations}
    with _client(coordinator) as c:
        def start():
            return c.start_deployment(
                model_id, deployment_id=deployment_id, number_of_allocations=number_of_allocations,
                threads_per_allocation=threads_per_allocation, queue_capacity=queue_capacity,
                priority=priority, cache_size=cache_size, timeout=timeout, wait_for=wait_for,
                adaptive_allocations=adaptive, max_batch_size=max_batch_size,
                max_batch_delay=max_batch_delay)
        if (format or (Format.table if sys.stdout.isatty() else Format.json)) == Format.table:
            _run(format, lambda: _with_progress(c, deployment_id or model_id, start))
        else:
            _run(format, start)


def _with_progress(client, deployment_id: str, call):
    """Run a start while showing allocations started / target, per node, until it answers."""
    import concurrent.futures as cf

    from rich.live import Live
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(call)
        with Live(refresh_per_second=4, transient=True) as live:
            while not fut.done():
                try:
                    routing = client.get_stats(deployment_id)
                    live.update(_rich_table(routing) or "")
                except ApiError:
                    live.update(f"starting {deployment_id} ...")
                try:
                    fut.result(0.5)
                except cf.TimeoutError:
                    pass
                except Exception:
                    break
        return fut.result()


@deployments_app.command("update")
def deployments_update(
    deployment_id: str,
    number_of_allocations: Optional[int] = typer.Option(None),
    adaptive_allocations: Optional[bool] = typer.Option(None, "--adaptive-allocations/--no-adaptive-allocations"),
    min_number_of_allocations: Optional[int] = typer.Option(None),
    max_number_of_allocations: Optional[int] = typer.Option(None),
    coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt,
) -> None:
    """Change a deployment's allocations. Example: mlfleet deployments update my-model --number-of-allocations 4"""
    adaptive: dict[str, Any] | None = None
    if adaptive_allocations is not None or min_number_of_allocations is not None or max_number_of_allocations is not None:
        adaptive = {}
        if adaptive_allocations is not None:
            adaptive["enabled"] = adaptive_allocations
        if min_number_of_allocations is not None:
            adaptive["min_number_of_allocations"] = min_number_of_allocations
        if max_number_of_allocations is not None:
            adaptive["max_number_of_allocations"] = max_number_of_allocations
    with _client(coordinator) as c:
        _run(format, lambda: c.update_deployment(deployment_id, number_of_allocations, adaptive))


@deployments_app.command("stop")
def deployments_stop(
    deployment_id: str, force: bool = typer.Option(False, "--force"),
    allow_no_match: bool = typer.Option(True, "--allow-no-match/--no-allow-no-match"),
    finish_pending_work: bool = typer.Option(False, "--finish-pending-work"),
    coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt,
) -> None:
    """Stop a deployment. Example: mlfleet deployments stop my-model --finish-pending-work"""
    with _client(coordinator) as c:
        _run(format, lambda: c.stop_deployment(deployment_id, force=force, allow_no_match=allow_no_match,
                                               finish_pending_work=finish_pending_work))


@deployments_app.command("clear-cache")
def deployments_clear_cache(deployment_id: str, coordinator: Optional[str] = CoordOpt,
                            format: Optional[Format] = FormatOpt) -> None:
    """Clear a deployment's inference cache on every node. Example: mlfleet deployments clear-cache my-model"""
    with _client(coordinator) as c:
        _run(format, lambda: c.clear_cache(deployment_id))


@deployments_app.command("stats")
def deployments_stats(deployment_id: Optional[str] = typer.Argument(None),
                      watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C."),
                      interval: str = typer.Option("2s", help="Refresh interval with --watch."),
                      coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """Deployment statistics. Example: mlfleet deployments stats my-model --watch"""
    period = _duration(interval, "interval") if watch else 0.0
    with _client(coordinator) as c:
        if not watch:
            _run(format, lambda: c.get_stats(deployment_id))
            return
        from rich.live import Live
        try:
            with Live(refresh_per_second=4) as live:
                while True:
                    try:
                        live.update(_rich_table(c.get_stats(deployment_id)) or "")
                    except ApiError as e:
                        live.update(f"[{e.status}] {e.reason}")
                    time.sleep(period)
        except KeyboardInterrupt:
            pass


# ---- inference and nodes -----------------------------------------------------------------------------

def _docs_from_json(text: str) -> list[dict[str, Any]]:
    import numpy as np
    try:
        docs = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--docs is not valid JSON: {e}") from None
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        raise typer.BadParameter("--docs must be a JSON list of objects")

    def arr(v: Any) -> Any:
        try:
            a = np.asarray(v)
        except ValueError as e:  # ragged lists
            raise typer.BadParameter(f"an input is not an array (are its rows of one length?): {e}",
                                     param_hint="--docs") from None
        return a.astype(np.float32) if a.dtype == np.float64 else a

    out = []
    for d in docs:
        d = dict(d)
        if "input" in d:
            d["input"] = arr(d["input"])
        if "inputs" in d and isinstance(d["inputs"], list):
            d["inputs"] = [arr(x) for x in d["inputs"]]
        out.append(d)
    return out


@app.command()
def infer(deployment_id: str, docs: str = typer.Option(..., "--docs", help="JSON list of docs."),
          timeout: str = typer.Option("10s"), coordinator: Optional[str] = CoordOpt,
          format: Optional[Format] = FormatOpt) -> None:
    """Run inference. Example: mlfleet infer my-model --docs '[{"input": [[1.0, 2.0]]}]'"""
    parsed = _docs_from_json(docs)
    with _client(coordinator) as c:
        _run(format, lambda: c.infer(deployment_id, parsed, timeout=timeout))


@nodes_app.command("list")
def nodes_list(coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """List live nodes. Example: mlfleet nodes list --format table"""
    with _client(coordinator) as c:
        _run(format, c.get_nodes)


@nodes_app.command("rotate-key")
def nodes_rotate_key(node_id: str,
                     public_key: str = typer.Option(..., "--public-key", help="The new agent key: its NAME.pub file or z85 text (listed as 'agent' in the authorized keys file)."),
                     coordinator: Optional[str] = CoordOpt, format: Optional[Format] = FormatOpt) -> None:
    """Move a node id to a new agent key; then restart that agent with the new key.

    Example: mlfleet nodes rotate-key host-1 --public-key /etc/mlfleet/keys/host-1-2027.pub
    """
    from mlfleet.common.security import public_key_text
    try:
        key = public_key_text(public_key)  # as the client reads it: z85 text or a file
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"[{public_key}] must be a NAME.pub file or a 40-character z85 "
                                 f"public key: {e}", param_hint="--public-key") from None
    with _client(coordinator) as c:
        _run(format, lambda: c.rotate_node_key(node_id, key))


config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_show(ctx: typer.Context, daemon: str = typer.Argument(..., help="coordinator, agent or gateway")) -> None:
    """Print the configuration a daemon would run with: flags (given after the daemon's name),
    MLFLEET_* variables and the --config file, each in its place.

    Example: mlfleet --config /etc/mlfleet/mlfleet.toml config show agent --node-id host-1
    """
    if daemon not in ("coordinator", "agent", "gateway"):
        raise typer.BadParameter("must be coordinator, agent or gateway", param_hint="DAEMON")
    _DRY_RUN["on"] = True
    try:
        code = typer.main.get_command(app).main(args=[daemon, *ctx.args], prog_name="mlfleet",
                                                 default_map=ctx.find_root().default_map,
                                                 auto_envvar_prefix="MLFLEET", standalone_mode=False)
    finally:
        _DRY_RUN["on"] = False
    if isinstance(code, int) and code:  # standalone_mode=False returns a refusal's Exit code
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""CURVE keys and roles. Off loopback every connection is encrypted and authenticated with
ZeroMQ CURVE; each client key has a role (after Elasticsearch's ``manage_ml``):

    admin   may do everything
    infer   may run inference and read (stats, nodes, models, routing), change nothing
    agent   may only speak the agent protocol

Key files are pyzmq's certificate files: ``NAME.key`` holds the secret (and public) key,
``NAME.pub`` the public key. The authorized-keys file has one ``ROLE Z85_PUBLIC_KEY`` per line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mlfleet.common.errors import Forbidden, Unauthorized

ROLES = ("admin", "infer", "agent")
ADMIN_OPS = frozenset({"put_model_chunk", "put_model", "delete_model", "start_deployment",
                       "update_deployment", "stop_deployment", "clear_cache"})
READ_OPS = frozenset({"get_models", "get_stats", "get_nodes", "get_routing", "await_routes", "ping", "infer"})
AGENT_OPS = frozenset({"register", "heartbeat", "model_chunk"})


def generate_keys(name: str, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret, public = out / f"{name}.key", out / f"{name}.pub"
    for p in (secret, public):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting a key")
    with tempfile.TemporaryDirectory() as tmp:
        pub_tmp, sec_tmp = zmq.auth.create_certificates(tmp, name)
        shutil.move(sec_tmp, secret)
        shutil.move(pub_tmp, public)
    os.chmod(secret, 0o600)
    return secret, public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key (pass the NAME.key file, not NAME.pub)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def load_authorized_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{z85_public_key: role}`` from lines ``ROLE KEY``; lines starting with ``#`` are comments
    (Z85 keys may contain ``#`` themselves, so only a leading one counts)."""
    keys: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES or len(parts[1]) != 40:
            raise ValueError(f"{path}:{n}: expected 'ROLE KEY' with ROLE one of {ROLES} and a "
                             "40-character Z85 public key")
        keys[parts[1]] = parts[0]
    return keys


def authorize(role: Optional[str], op: str, key: Optional[str]) -> None:
    """Raise 401 for a key we do not know, 403 for a role that may not do ``op``."""
    if role is None:
        raise Unauthorized(f"no valid key: the public key [{key or 'none'}] is not authorized on "
                           "this cluster")
    allowed = (role == "admin" and op not in AGENT_OPS) or (role == "infer" and op in READ_OPS) or (
        role == "agent" and op in AGENT_OPS | {"ping"})
    if not allowed:
        raise Forbidden(f"action [{op}] is unauthorized for a key with role [{role}]")


@dataclass(frozen=True)
class Curve:
    """This process's key pair and, for clients, the server's public key."""
    public: bytes
    secret: bytes
    server_public: Optional[bytes] = None

    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, server_public: Optional[bytes] = None) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server_public or self.server_public


def start_authenticator(ctx: zmq.Context) -> ThreadAuthenticator:
    """Let every CURVE key complete the handshake; the daemon then answers 401/403 by role, which
    a client can read (a refused handshake would only look like silence)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return auth


def client_curve(secret_key: Optional[str], server_public_key: Optional[str]) -> Optional[Curve]:
    secret_key = secret_key or os.environ.get("MLFLEET_SECRET_KEY")
    server_public_key = server_public_key or os.environ.get("MLFLEET_COORDINATOR_KEY")
    if not secret_key and not server_public_key:
        return None
    if not (secret_key and server_public_key):
        raise ValueError("CURVE needs both a secret key (secret_key / MLFLEET_SECRET_KEY) and the "
                         "coordinator's public key (server_public_key / MLFLEET_COORDINATOR_KEY)")
    public, secret = load_secret(secret_key)
    return Curve(public, secret, load_public(server_public_key))

"""API keys for the gateway, as Elasticsearch takes them: ``Authorization: ApiKey <encoded>``,
where ``encoded`` is base64 of ``id:api_key``. Each key has a role (``common.security``'s):

    admin   everything
    infer   inference and reads (get models, stats); anything else is 403

The keys file has one ``ROLE ID SHA256_OF_API_KEY NAME`` per line (``#`` starts a comment): it
holds no secret, only each key's hash, so a stolen copy lets nobody in. ``mlfleet keys
api-key NAME --role ROLE --keys-file FILE`` appends a line and prints the key, once. The gateway
reads the file again when it changes (checked at most every 2 s), so keys are added and revoked
without a restart; a malformed edit is logged and the keys already loaded stay in force.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlfleet.gateway.esapi import EsError

log = logging.getLogger("mlfleet.gateway")

ROLES = ("admin", "infer")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
RELOAD_EVERY_S = 2.0
CHALLENGE = {"WWW-Authenticate": 'ApiKey, Basic realm="security" charset="UTF-8"'}


@dataclass(frozen=True)
class Key:
    id: str
    role: str
    sha256: str
    name: str


def _hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def load_keys(path: str | os.PathLike[str]) -> dict[str, Key]:
    keys: dict[str, Key] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if (len(parts) != 4 or parts[0] not in ROLES or not _ID_RE.match(parts[1])
                or not re.fullmatch(r"[0-9a-f]{64}", parts[2])):
            raise ValueError(f"{path}:{n}: expected 'ROLE ID SHA256 NAME' with ROLE one of {ROLES}, "
                             "an id of letters, digits, '-' and '_', and the key's sha256 in hex")
        keys[parts[1]] = Key(parts[1], parts[0], parts[2], parts[3])
    return keys


def create_api_key(path: str | os.PathLike[str], name: str, role: str) -> dict[str, Any]:
    """Append a new key to the keys file (created with mode 600); return it as Elasticsearch's
    create-API-key answer, plus its role. The key itself is shown only here."""
    if role not in ROLES:
        raise ValueError(f"[role] must be one of {ROLES}, got [{role}]")
    if not _NAME_RE.match(name):
        raise ValueError("[name] must be 1 to 128 letters, digits, '_', '.', '@' or '-'")
    p = Path(path)
    if p.exists():
        load_keys(p)  # never append to a file the gateway could not read
    key_id, api_key = secrets.token_urlsafe(15), secrets.token_urlsafe(16)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{role} {key_id} {_hash(api_key)} {name}\n")
        f.flush()
        os.fsync(f.fileno())
    return {"id": key_id, "name": name, "api_key": api_key,
            "encoded": base64.b64encode(f"{key_id}:{api_key}".encode()).decode(), "role": role}


def unauthorized(reason: str) -> EsError:
    return EsError(401, "security_exception", reason, headers=CHALLENGE,
                   extra={"header": {"WWW-Authenticate": list(CHALLENGE.values())}})


class ApiKeys:
    """The keys file as the gateway holds it, read again when it changes."""

    def __init__(self, path: str | os.PathLike[str], clock=time.monotonic) -> None:
        self.path = Path(path)
        self.clock = clock
        self.keys = load_keys(self.path)  # a bad file at start stops the gateway
        self._mtime = self._stat()
        self._checked = clock()

    def _stat(self) -> Optional[tuple[int, int]]:
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = self.clock()
        if now - self._checked < RELOAD_EVERY_S:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self.keys = load_keys(self.path)
            log.info("read %d API keys from %s", len(self.keys), self.path)
        except (OSError, ValueError) as e:
            log.error("keeping the %d API keys already loaded: %s", len(self.keys), e)

    def authenticate(self, header: Optional[str], path: str) -> Key:
        """The key an ``Authorization`` header carries, or a 401 in Elasticsearch's words."""
        self._maybe_reload()
        if not header:
            raise unauthorized(f"missing authentication credentials for REST request [{path}]")
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "apikey":
            raise unauthorized(f"unable to authenticate with provided credentials and anonymous access "
                               f"is not allowed for this request (scheme [{scheme}]: use "
                               "'Authorization: ApiKey <base64 of id:api_key>')")
        try:
            key_id, sep, api_key = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # ValueError: a credential not in ASCII
            sep = ""
        if not sep:
            raise unauthorized("unable to authenticate with provided credentials and anonymous access is "
                               "not allowed for this request (the ApiKey credential is not base64 of "
                               "id:api_key)")
        key = self.keys.get(key_id)
        if key is None or not hmac.compare_digest(key.sha256, _hash(api_key)):
            raise unauthorized("unable to authenticate with provided credentials and anonymous access is "
                               f"not allowed for this request (API key id [{key_id}])")
        return key


def forbidden(action: str, key: Key) -> EsError:
    return EsError(403, "security_exception",
                   f"action [{action}] is unauthorized for API key id [{key.id}] of user [{key.name}] "
                   f"with role [{key.role}], this action is granted by the role [admin]")

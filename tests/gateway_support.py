"""Shared by the gateway tests: a gateway daemon on a live cluster, and a plain HTTP client."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import torch

from tests.helpers import Daemon, start_daemon


def start_gateway(workdir: Path, coordinator: str, name: str = "gateway",
                  extra: Optional[list[str]] = None, listen: str = "http://127.0.0.1:0") -> Daemon:
    return start_daemon("gateway", ["--listen", listen, "--coordinator", coordinator, *(extra or [])],
                        workdir, name)


class Http:
    """One keep-alive connection; ``call`` answers (status, headers, JSON body)."""

    def __init__(self, endpoint: str, api_key: Optional[str] = None,
                 context: Optional[ssl.SSLContext] = None) -> None:
        u = urlsplit(endpoint)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        kw: dict[str, Any] = {"context": context} if u.scheme == "https" else {}
        self.conn = cls(u.hostname, u.port, timeout=60, **kw)
        self.api_key = api_key

    def call(self, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None,
             raw: Optional[bytes] = None) -> tuple[int, dict[str, str], Any]:
        h = dict(headers or {})
        if self.api_key and "Authorization" not in h:
            h["Authorization"] = f"ApiKey {self.api_key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=data, headers=h)
        r = self.conn.getresponse()
        text = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(text) if text else None

    def close(self) -> None:
        self.conn.close()


def curl(*args: str, env: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    """Run curl (a shell command line is given as one string, as a user types it); answers the
    HTTP status and the JSON body."""
    import os
    cmd = args[0] + " --silent --show-error --write-out '\\n%{http_code}'"
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=90,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    body, _, status = p.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def es_error(body: Any, status: int, type: str) -> str:
    """Check Elasticsearch's error shape; returns the reason."""
    assert body["status"] == status, body
    err = body["error"]
    assert err["type"] == type, body
    assert err["root_cause"] and err["root_cause"][0]["type"] == type, body
    assert err["root_cause"][0]["reason"] == err["reason"]
    return err["reason"]


class TinyEncoder(torch.nn.Module):
    """A text model as mlfleet's text_embedding task calls it: (ids, mask) -> token states."""

    def __init__(self, vocab: int = 32, dim: int = 6) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) * mask.unsqueeze(-1).to(torch.float32)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "the", "cat", "sat", "##s"]


def b64_parts(data: bytes, n: int) -> list[str]:
    size = -(-len(data) // n)
    return [base64.b64encode(data[i * size:(i + 1) * size]).decode() for i in range(n)]

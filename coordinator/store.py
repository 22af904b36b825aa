"""Durable coordinator state: SQLite in WAL mode plus content-addressed model files.

Every change is committed before it is acknowledged, so a coordinator restart loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from mlfleet.coordinator.state import DeploymentRecord, ModelRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, task TEXT NOT NULL,
    tokenizer_sha256 TEXT, model_config TEXT, create_time_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    deployment_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.uploads_dir = self.root / "uploads"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "state.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- models ----------------------------------------------------------------------------
    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.pt"

    def tokenizer_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.tokenizer.json"

    def blob_path(self, sha256: str) -> Path | None:
        for p in (self.model_path(sha256), self.tokenizer_path(sha256)):
            if p.exists():
                return p
        return None

    def put_blob(self, data: bytes, suffix: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.models_dir / f"{sha}{suffix}"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def save_model(self, m: ModelRecord) -> None:
        self.db.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?)",
            (m.model_id, m.sha256, m.size, m.task, m.tokenizer_sha256,
             json.dumps(m.model_config) if m.model_config is not None else None, m.create_time_ms))

    def delete_model(self, m: ModelRecord) -> None:
        self.db.execute("DELETE FROM models WHERE model_id=?", (m.model_id,))
        for sha, path in ((m.sha256, self.model_path(m.sha256)),
                          (m.tokenizer_sha256, self.tokenizer_path(m.tokenizer_sha256 or ""))):
            if sha and not self.db.execute(
                    "SELECT 1 FROM models WHERE sha256=? OR tokenizer_sha256=?", (sha, sha)).fetchone():
                path.unlink(missing_ok=True)

    def load_models(self) -> Iterator[ModelRecord]:
        for row in self.db.execute("SELECT model_id, sha256, size, task, tokenizer_sha256, "
                                   "model_config, create_time_ms FROM models"):
            yield ModelRecord(row[0], row[1], row[2], row[3], row[4],
                              json.loads(row[5]) if row[5] else None, row[6])

    # -- deployments -----------------------------------------------------------------------
    def save_deployment(self, d: DeploymentRecord) -> None:
        self.db.execute("INSERT OR REPLACE INTO deployments VALUES (?,?,?)",
                        (d.deployment_id, d.model_id, json.dumps(d.to_json())))

    def delete_deployment(self, deployment_id: str) -> None:
        self.db.execute("DELETE FROM deployments WHERE deployment_id=?", (deployment_id,))

    def load_deployments(self) -> Iterator[DeploymentRecord]:
        for (record,) in self.db.execute("SELECT record FROM deployments"):
            yield DeploymentRecord.from_json(json.loads(record))

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))


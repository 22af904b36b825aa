"""Durable coordinator state: SQLite in WAL mode plus content-addressed model files.

Every change is committed before it is acknowledged, so a coordinator restart loses nothing.

Files before rows. A model file (``models/<sha256>.pt``) or blob (``models/<sha256><suffix>``)
is written to a temporary name, fsynced, renamed into place and its directory fsynced
(``mlfleet.common.files``) *before* the SQLite row that names it is committed (``synchronous=FULL``
makes the commit itself durable). A crash between the two leaves an unreferenced file, which
``check_models`` removes at the next start; it never leaves a row pointing at a missing or
empty file. Deleting goes the other way: the row is committed first, then the file removed.

Threads. The SQLite connection belongs to the loop thread: every method that touches rows
(``save_*``, ``delete_*``, ``load_*``, ``*_meta``, ``check_models``) runs there. The methods
that do large file I/O or hashing touch no rows and are meant to run on an ``Offload`` pool
thread: ``append_upload``, ``finish_upload``, ``read_chunk``, ``put_blob``, ``cleanup_uploads``.

How the server uses the upload API (each call below on Offload; results back on the loop):

    put_model_chunk:  size = store.append_upload(upload_id, offset, data)
    put_model:        size = store.finish_upload(upload_id, sha256)      # hash, validate, place
                      tok = store.put_blob(tokenizer, ".tokenizer.json") # if any
                      then, on the loop: re-check model_id is free, store.save_model(rec)
    model_chunk:      data, size = store.read_chunk(sha256, offset, length)
    at start:         problems = store.check_models()   # on the loop, before serving; log them
    at start and every few minutes:  store.cleanup_uploads(max_age_s)

Errors are ``mlfleet.common.errors`` API errors ready for a reply: ``BadRequest`` for a bad
offset, hash, archive or upload, ``NotFound`` for an unknown blob, ``ServerError`` with a
message like ``no space left on device writing <path>: ...`` for a full disk.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mlfleet.common import formats
from mlfleet.common.errors import BadRequest, NotFound, ServerError
from mlfleet.common.files import (
    DiskFullError,
    disk_error,
    durable_replace,
    durable_write,
    fsync_file,
    read_at,
    sha256_file,
    unlink_quiet,
)
from mlfleet.coordinator.state import DeploymentRecord, ModelRecord

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, task TEXT NOT NULL,
    tokenizer_sha256 TEXT, model_config TEXT, create_time_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    deployment_id TEXT PRIMARY KEY, model_id TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
UPLOAD_RE = re.compile(r"^[0-9a-f]{16,64}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNK_BYTES = 8 << 20
TMP_SUFFIX = ".tmp"


def is_model_archive(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a model mlfleet can serve (TorchScript, torch.export or AOTInductor)."""
    return model_format_problem(path) is None


def model_format_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a model mlfleet can serve, or None (see ``common.formats``)."""
    try:
        formats.detect(path)
    except formats.UnknownFormat as e:
        return str(e)
    return None


def model_config_with_format(path: str | os.PathLike[str], model_config: dict | None) -> dict:
    """The model's config as stored: ``format`` set from the stored file's contents (400 when the
    config names another format, or the file is no model), ``example_input`` made JSON."""
    try:
        return formats.stored_config(model_config, formats.detect(path))
    except formats.UnknownFormat as e:
        raise BadRequest(str(e)) from None


class StateFileError(ValueError):
    """The state file cannot be opened or read (not SQLite, truncated, unreadable): the daemon
    cannot start; the message names the file and SQLite's reason. A ValueError: the CLI ends with
    exit code 2 (no restart loop) and this message, no traceback."""


def _record_problem(record: object) -> str | None:
    """Why a stored deployment record cannot be loaded (a missing or unknown field, a value of
    the wrong type), or None. Fields whose type is not listed here are left to the record."""
    if not isinstance(record, dict):
        return f"the record is a {type(record).__name__}, not an object"
    fields = {f.name: f for f in dataclasses.fields(DeploymentRecord)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        return f"unknown fields {unknown}"
    for name, f in fields.items():
        if name not in record:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                return f"field [{name}] is missing"
            continue
        check = _FIELD_CHECKS.get(str(f.type))
        if check is not None and not check(record[name]):
            return f"field [{name}] is {record[name]!r:.80}, not a {f.type}"
    return None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELD_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: _is_int(v) or isinstance(v, float),
    "Optional[str]": lambda v: v is None or isinstance(v, str),
    "Optional[Adaptive]": lambda v: v is None or isinstance(v, dict),
    "dict[str, int]": lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _is_int(x) for k, x in v.items()),
}


def _storage_error(e: OSError, path: Path, action: str = "writing") -> ServerError:
    clear = disk_error(e, path, action)
    if isinstance(clear, DiskFullError):
        return ServerError(str(clear))
    return ServerError(f"error {action} {path}: {e}")


class Store:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.uploads_dir = self.root / "uploads"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "state.db"
        self.bad_rows: dict[str, str] = {}  # deployment id -> why its stored row was not loaded
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as e:
            raise StateFileError(f"cannot open the state file {self.path}: {e}") from None
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(str(p) for p in problems[:5]))
        except sqlite3.Error as e:
            self.db.close()
            raise StateFileError(f"the state file {self.path} is damaged or not a state file ({e}); "
                                 "restore it from a backup, or move it away to start empty") from None
        # Shared between the loop and Offload threads, under _lock:
        self._lock = threading.Lock()
        self._busy_uploads: set[str] = set()            # uploads being appended to or finished
        self._pinned: collections.Counter[str] = collections.Counter()  # shas being placed

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, args: tuple) -> None:
        """One committed change. SQLite's failures (``database or disk is full``, an I/O error)
        become a ServerError (500) naming the state file, so the caller's reply says what to
        fix; the caller changes its memory only after this returns."""
        try:
            self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise ServerError(f"could not write the coordinator's state file {self.path} "
                              f"(data dir {self.root}): {e}; nothing was changed") from None

    # -- models ----------------------------------------------------------------------------
    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.pt"

    def tokenizer_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.tokenizer.json"

    def upload_path(self, upload_id: str) -> Path:
        if not UPLOAD_RE.match(upload_id):
            raise BadRequest("[upload_id] must be 16 to 64 lowercase hex characters")
        return self.uploads_dir / upload_id

    def blob_path(self, sha256: str) -> Path | None:
        for p in (self.model_path(sha256), self.tokenizer_path(sha256)):
            if p.exists():
                return p
        return None

    def put_blob(self, data: bytes, suffix: str) -> str:
        """Store ``data`` as ``models/<sha256><suffix>``, durably; returns the sha256. Blocking
        (hash and fsync): Offload it. A full disk raises ``ServerError`` and leaves nothing."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.models_dir / f"{sha}{suffix}"
        with self._lock:
            self._pinned[sha] += 1
        try:
            try:
                if path.stat().st_size == len(data):
                    return sha
            except FileNotFoundError:
                pass
            try:
                durable_write(path, data)
            except OSError as e:
                raise _storage_error(e, path) from e
            return sha
        finally:
            self._unpin(sha)

    def _unpin(self, sha: str) -> None:
        with self._lock:
            self._pinned[sha] -= 1
            if self._pinned[sha] <= 0:
                del self._pinned[sha]

    def save_model(self, m: ModelRecord) -> None:
        """Commit a model's row. Its files must already be in place (``finish_upload``,
        ``put_blob`` returned): a row is never committed for a file that is not there."""
        path = self.model_path(m.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ServerError(f"model file {path} for model [{m.model_id}] is missing; "
                              "upload the model again") from None
        if size != m.size:
            raise ServerError(f"model file {path} for model [{m.model_id}] has {size} bytes, "
                              f"expected {m.size}; upload the model again")
        if m.tokenizer_sha256 and not self.tokenizer_path(m.tokenizer_sha256).exists():
            raise ServerError(f"tokenizer file for model [{m.model_id}] is missing; upload the model again")
        self._write(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?)",
            (m.model_id, m.sha256, m.size, m.task, m.tokenizer_sha256,
             json.dumps(m.model_config) if m.model_config is not None else None, m.create_time_ms))

    def delete_model(self, m: ModelRecord) -> None:
        """Commit the row's deletion, then remove files no other row references (nor an upload
        being finished right now)."""
        self._write("DELETE FROM models WHERE model_id=?", (m.model_id,))
        for sha, path in ((m.sha256, self.model_path(m.sha256)),
                          (m.tokenizer_sha256, self.tokenizer_path(m.tokenizer_sha256 or ""))):
            if sha and not self.db.execute(
                    "SELECT 1 FROM models WHERE sha256=? OR tokenizer_sha256=?", (sha, sha)).fetchone():
                with self._lock:
                    if not self._pinned.get(sha):
                        path.unlink(missing_ok=True)

    def _rows(self, sql: str) -> list[tuple]:
        try:
            return self.db.execute(sql).fetchall()
        except sqlite3.Error as e:
            raise StateFileError(f"cannot read the state file {self.path} ({e}); restore it from a "
                                 "backup, or move it away to start empty") from None

    def load_models(self) -> Iterator[ModelRecord]:
        """The model rows that can be loaded; one that cannot is logged and left in the file."""
        for row in self._rows("SELECT model_id, sha256, size, task, tokenizer_sha256, "
                              "model_config, create_time_ms FROM models"):
            try:
                config = json.loads(row[5]) if row[5] else None
                if config is not None and not isinstance(config, dict):
                    raise ValueError(f"model_config is a {type(config).__name__}, not an object")
                if not (isinstance(row[0], str) and isinstance(row[1], str) and _is_int(row[2])
                        and isinstance(row[3], str) and _is_int(row[6])):
                    raise ValueError("a column has a value of the wrong type")
            except ValueError as e:
                log.error("state file %s: model row [%s] cannot be loaded (%s); it is left in the "
                          "file for an operator and not served", self.path, str(row[0])[:64], e)
                continue
            yield ModelRecord(row[0], row[1], row[2], row[3], row[4], config, row[6])

    def check_models(self, remove_orphans: bool = True) -> list[tuple[str, str]]:
        """At start-up, on the loop, before serving: every model row's file must exist with the
        row's size (and its tokenizer exist). Returns ``[(model_id, problem), ...]`` for the
        server to log (an agent fetching such a model gets 404 and fails the route with that
        reason). With ``remove_orphans``, also removes model files no row references (left by
        a crash between placing a file and committing its row) and leftover temporary files;
        only call it so while no upload is being finished."""
        problems: list[tuple[str, str]] = []
        referenced: set[str] = set()
        for m in self.load_models():
            path = self.model_path(m.sha256)
            referenced.add(path.name)
            try:
                size = path.stat().st_size
                if size != m.size:
                    problems.append((m.model_id, f"model file {path} has {size} bytes, expected {m.size}"))
            except FileNotFoundError:
                problems.append((m.model_id, f"model file {path} is missing"))
            if m.tokenizer_sha256:
                tok = self.tokenizer_path(m.tokenizer_sha256)
                referenced.add(tok.name)
                if not tok.exists():
                    problems.append((m.model_id, f"tokenizer file {tok} is missing"))
        if remove_orphans:
            with self._lock:
                pinned = set(self._pinned)
            for p in self.models_dir.iterdir():
                if p.name in referenced or p.name.split(".", 1)[0] in pinned:
                    continue
                log.info("removing unreferenced model file %s", p)
                unlink_quiet(p)
        return problems

    # -- uploads (blocking: run these on Offload) -------------------------------------------
    def _claim(self, upload_id: str) -> None:
        with self._lock:
            if upload_id in self._busy_uploads:
                raise BadRequest(f"upload [{upload_id}] is busy with another request; "
                                 "send its chunks one at a time")
            self._busy_uploads.add(upload_id)

    def _release(self, upload_id: str) -> None:
        with self._lock:
            self._busy_uploads.discard(upload_id)

    def append_upload(self, upload_id: str, offset: int, data: bytes) -> int:
        """Append a chunk to upload ``upload_id`` (created by its first chunk, offset 0);
        ``offset`` must equal the bytes received so far. Returns the new size. A failed write
        never leaves a partial chunk behind; on a full disk the whole upload is removed (to
        free its space) and ``ServerError("no space left on device writing ...")`` raised."""
        path = self.upload_path(upload_id)
        self._claim(upload_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                size = os.fstat(fd).st_size
                if offset != size:
                    if size == 0:
                        unlink_quiet(path)  # created by this very call
                    raise BadRequest(f"[offset] must be [{size}], the bytes received so far, got [{offset}]")
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as e:
                    try:
                        os.ftruncate(fd, size)  # never leave a partial chunk
                    except OSError:
                        unlink_quiet(path)
                    clear = disk_error(e, path)
                    if isinstance(clear, DiskFullError):
                        unlink_quiet(path)  # give its space back
                        raise ServerError(f"{clear}; upload [{upload_id}] discarded: free some "
                                          "space and upload the model again") from e
                    raise ServerError(f"error writing {path}: {e}") from e
                return size + len(data)
            finally:
                os.close(fd)
        finally:
            self._release(upload_id)

    def finish_upload(self, upload_id: str, sha256: str) -> int:
        """Verify upload ``upload_id`` against ``sha256``, check it is a model (``common.formats``),
        and place it durably as ``models/<sha256>.pt`` (fsync, rename, fsync the directories).
        Returns its size. The upload is gone afterwards, whatever happened. Blocking (a hash
        over the whole file): Offload it, then commit the row with ``save_model`` on the loop.

        Raises ``BadRequest`` (no such upload, wrong sha256, not a model) or ``ServerError``
        (disk errors, e.g. ``no space left on device ...``)."""
        if not SHA_RE.match(sha256):
            raise BadRequest("[sha256] must be 64 lowercase hex characters")
        upload = self.upload_path(upload_id)
        self._claim(upload_id)
        with self._lock:
            self._pinned[sha256] += 1
        try:
            try:
                got = sha256_file(upload)
            except FileNotFoundError:
                raise BadRequest(f"no upload [{upload_id}]: "
                                 "send the model with put_model_chunk first") from None
            if got != sha256:
                raise BadRequest(f"[sha256] does not match the uploaded bytes (got {got})")
            if (problem := model_format_problem(upload)) is not None:
                raise BadRequest(f"[file] is not a model: {problem}")
            size = upload.stat().st_size
            dest = self.model_path(sha256)
            try:
                if dest.exists() and dest.stat().st_size == size:
                    fsync_file(dest)  # a copy from before durable writes: make sure it is on disk
                else:
                    durable_replace(upload, dest)
            except OSError as e:
                raise _storage_error(e, dest, "storing") from e
            return size
        finally:
            unlink_quiet(upload)
            self._unpin(sha256)
            self._release(upload_id)

    def read_chunk(self, sha256: str, offset: int, length: int) -> tuple[bytes, int]:
        """``(data, total_size)`` of model file or blob ``sha256`` from ``offset``; blocking."""
        if not SHA_RE.match(sha256):
            raise BadRequest("[sha256] must be 64 lowercase hex characters")
        if offset < 0 or not 0 < length <= MAX_CHUNK_BYTES:
            raise BadRequest("[offset] must be >= 0 and [length] between 1 and 8mb")
        for path in (self.model_path(sha256), self.tokenizer_path(sha256)):
            try:
                return read_at(path, offset, length)
            except FileNotFoundError:
                continue
        raise NotFound(f"Could not find model definition [{sha256}]")

    def cleanup_uploads(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Remove uploads untouched for ``max_age_s`` (abandoned by their client) and temporary
        files of interrupted durable writes in models/. Uploads being written or finished are
        kept. Returns the names removed. Call at start and every few minutes (on Offload)."""
        now = time.time() if now is None else now
        removed: list[str] = []
        candidates = [(p, False) for p in self.uploads_dir.iterdir()] + [
            (p, True) for p in self.models_dir.glob(f"*{TMP_SUFFIX}")]
        for p, is_tmp in candidates:
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < max_age_s:
                continue
            with self._lock:
                if not is_tmp and p.name in self._busy_uploads:
                    continue
                if unlink_quiet(p):
                    removed.append(p.name)
        if removed:
            log.info("removed %d abandoned upload(s) and temporary file(s): %s",
                     len(removed), ", ".join(removed))
        return removed

    # -- deployments -----------------------------------------------------------------------
    def save_deployment(self, d: DeploymentRecord) -> None:
        self._write("INSERT OR REPLACE INTO deployments VALUES (?,?,?)",
                        (d.deployment_id, d.model_id, json.dumps(d.to_json())))

    def delete_deployment(self, deployment_id: str) -> None:
        self._write("DELETE FROM deployments WHERE deployment_id=?", (deployment_id,))

    def load_deployments(self) -> Iterator[DeploymentRecord]:
        """The deployment rows that can be loaded. A row that cannot (bad JSON, an unknown or
        missing field, a value of the wrong type) is logged by id, recorded in ``bad_rows`` and
        left in the file, untouched, for an operator: never loaded half-way, never deleted."""
        for deployment_id, record in self._rows("SELECT deployment_id, record FROM deployments"):
            try:
                d = json.loads(record)
                problem = _record_problem(d)
                if problem is None and d["deployment_id"] != deployment_id:
                    problem = f"the record's deployment_id is [{d['deployment_id']!s:.64}]"
                if problem is None:
                    yield DeploymentRecord.from_json(d)
                    continue
            except (ValueError, TypeError) as e:
                problem = f"{type(e).__name__}: {e}"
            self.set_aside(str(deployment_id), problem)

    def set_aside(self, deployment_id: str, problem: str) -> None:
        """A stored deployment that is not loaded: logged; its row stays in the file."""
        self.bad_rows[deployment_id] = problem
        log.error("state file %s: deployment row [%s] cannot be loaded (%s); it is left in the file "
                  "for an operator and not served", self.path, deployment_id[:64], problem)

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def delete_meta(self, key: str) -> None:
        self._write("DELETE FROM meta WHERE key=?", (key,))

"""Durable files (common/files.py) and the coordinator store's files: written to a temporary name,
fsynced, renamed, the directory fsynced, and only then a row committed; full disks give clear
errors and leave nothing half-written; abandoned uploads are cleaned up."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import zipfile

import pytest

from mlfleet.common import files
from mlfleet.common.errors import BadRequest, NotFound, ServerError
from mlfleet.common.files import DiskFullError
from mlfleet.coordinator.state import ModelRecord
from mlfleet.coordinator.store import Store

pytestmark = pytest.mark.timeout(60)


# ---- helpers -----------------------------------------------------------------------------------
def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd{fd}"


@pytest.fixture
def io_log(monkeypatch):
    """Records fsyncs and renames, in order, as ("fsync", path) and ("replace", src, dst)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", _fd_path(fd)))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _archive(tag: bytes = b"") -> bytes:
    """Bytes shaped like a torch.jit.save archive (what the store checks), without torch."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/data.pkl", b"pickle" + tag)
        z.writestr("m/code/__torch__.py", b"code")
        z.writestr("m/constants.pkl", b"c")
    return buf.getvalue()


def _upload(store: Store, upload_id: str, data: bytes, chunk: int = 1000) -> None:
    for off in range(0, len(data), chunk):
        assert store.append_upload(upload_id, off, data[off:off + chunk]) == min(len(data), off + chunk)


def _record(model_id: str, data: bytes, tok: str | None = None) -> ModelRecord:
    return ModelRecord(model_id, hashlib.sha256(data).hexdigest(), len(data), "pass_through", tok, None, 1)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def _no_space(real):
    """An os.write that fails with ENOSPC once it has written ``budget`` bytes."""
    state = {"budget": 100}

    def write(fd, data):
        if state["budget"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[:state["budget"]]))
        state["budget"] -= n
        return n
    return write


# ---- common/files.py ---------------------------------------------------------------------------
def test_durable_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, io_log):
    dest = tmp_path / "blob"
    files.durable_write(dest, b"hello")
    assert dest.read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]
    kinds = [e[0] for e in io_log]
    i = kinds.index("replace")
    tmp = io_log[i][1]
    assert io_log[i][2] == str(dest)
    assert ("fsync", tmp) in io_log[:i], "the file is fsynced before it is renamed"
    assert ("fsync", str(tmp_path)) in io_log[i + 1:], "the directory is fsynced after the rename"


def test_durable_write_on_a_full_disk_says_so_and_leaves_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "blob"
    dest.write_bytes(b"old")
    monkeypatch.setattr(os, "write", _no_space(os.write))
    with pytest.raises(DiskFullError) as ei:
        files.durable_write(dest, b"x" * 1000)
    monkeypatch.undo()
    assert str(ei.value).startswith(f"no space left on device writing {dest}: ")
    assert ei.value.errno == errno.ENOSPC
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


def test_disk_errors_are_explained_and_others_left_alone(tmp_path):
    p = tmp_path / "x"
    for err, words in ((errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded"),
                       (errno.EROFS, "read-only file system")):
        e = files.disk_error(OSError(err, os.strerror(err)), p)
        assert isinstance(e, DiskFullError) and str(e).startswith(f"{words} writing {p}: ")
        assert files.is_disk_full(e)
    other = OSError(errno.EIO, "io")
    assert files.disk_error(other, p) is other
    with pytest.raises(DiskFullError, match="no space left on device renaming"):
        with files.explain_disk_errors(p, "renaming"):
            raise OSError(errno.ENOSPC, "full")


def test_sha256_write_at_and_read_at(tmp_path):
    p = tmp_path / "f"
    data = os.urandom(3 << 20 | 17)
    p.write_bytes(b"\0" * len(data))
    half = len(data) // 2
    files.write_at(p, half, data[half:])
    files.write_at(p, 0, data[:half])
    assert files.sha256_file(p, chunk=1 << 16) == hashlib.sha256(data).hexdigest()
    assert files.read_at(p, 10, 5) == (data[10:15], len(data))
    with pytest.raises(FileNotFoundError):
        files.write_at(tmp_path / "missing", 0, b"x")  # never creates the file
    assert files.unlink_quiet(p) and not files.unlink_quiet(p)


# ---- coordinator/store.py ----------------------------------------------------------------------
def test_finish_upload_places_the_file_durably_before_the_row_is_committed(store, io_log):
    data = _archive()
    sha = hashlib.sha256(data).hexdigest()
    _upload(store, "ab" * 8, data)
    assert store.finish_upload("ab" * 8, sha) == len(data)
    dest = store.model_path(sha)
    assert dest.read_bytes() == data
    assert not list(store.uploads_dir.iterdir())
    kinds = [e[0] for e in io_log]
    i = kinds.index("replace")
    assert io_log[i][2] == str(dest)
    assert ("fsync", io_log[i][1]) in io_log[:i]
    assert ("fsync", str(store.models_dir)) in io_log[i + 1:]
    assert ("fsync", str(store.uploads_dir)) in io_log[i + 1:]
    # the row comes after the file: save_model refuses a record whose file is not in place
    store.save_model(_record("m1", data))
    with pytest.raises(ServerError, match="missing"):
        store.save_model(_record("m2", b"never uploaded"))
    with pytest.raises(ServerError, match="expected"):
        store.save_model(ModelRecord("m3", sha, len(data) + 1, "pass_through", None, None, 1))
    assert [r.model_id for r in store.load_models()] == ["m1"]


def test_finish_upload_with_the_wrong_hash_or_not_a_model_removes_the_upload(store):
    data = _archive()
    _upload(store, "cd" * 8, data)
    with pytest.raises(BadRequest, match="does not match the uploaded bytes"):
        store.finish_upload("cd" * 8, "0" * 64)
    assert not list(store.uploads_dir.iterdir()) and not list(store.models_dir.iterdir())
    junk = b"not a zip" * 100
    _upload(store, "ef" * 8, junk)
    with pytest.raises(BadRequest, match=r"\[file\] is not a model: .*not a zip archive"):
        store.finish_upload("ef" * 8, hashlib.sha256(junk).hexdigest())
    assert not list(store.uploads_dir.iterdir()) and not list(store.models_dir.iterdir())
    with pytest.raises(BadRequest, match="no upload"):
        store.finish_upload("ab" * 8, "0" * 64)
    with pytest.raises(BadRequest, match="upload_id"):
        store.append_upload("../../etc", 0, b"x")


def test_append_upload_checks_offsets_and_a_full_disk_leaves_nothing(store, monkeypatch):
    assert store.append_upload("12" * 8, 0, b"abc") == 3
    with pytest.raises(BadRequest, match=r"must be \[3\]"):
        store.append_upload("12" * 8, 1, b"x")
    assert store.append_upload("12" * 8, 3, b"def") == 6
    monkeypatch.setattr(os, "write", _no_space(os.write))
    with pytest.raises(ServerError) as ei:
        store.append_upload("12" * 8, 6, b"y" * 1000)
    monkeypatch.undo()
    path = store.uploads_dir / ("12" * 8)
    assert f"no space left on device writing {path}" in ei.value.reason
    assert "upload the model again" in ei.value.reason
    assert not path.exists(), "a full disk gives the upload's space back, no partial chunk left"


def test_put_blob_is_durable_and_idempotent(store, io_log):
    sha = store.put_blob(b"{}", ".tokenizer.json")
    assert store.tokenizer_path(sha).read_bytes() == b"{}"
    assert ("fsync", str(store.models_dir)) in io_log
    io_log.clear()
    assert store.put_blob(b"{}", ".tokenizer.json") == sha
    assert not io_log, "an existing blob is not written again"
    assert store.blob_path(sha) == store.tokenizer_path(sha)


def test_read_chunk_serves_models_and_blobs(store):
    data = _archive()
    sha = hashlib.sha256(data).hexdigest()
    _upload(store, "ab" * 8, data)
    store.finish_upload("ab" * 8, sha)
    assert store.read_chunk(sha, 5, 10) == (data[5:15], len(data))
    assert store.read_chunk(sha, len(data), 10) == (b"", len(data))
    tok = store.put_blob(b"tokenizer", ".tokenizer.json")
    assert store.read_chunk(tok, 0, 100) == (b"tokenizer", 9)
    with pytest.raises(NotFound):
        store.read_chunk("0" * 64, 0, 10)
    with pytest.raises(BadRequest):
        store.read_chunk(sha, -1, 10)


def test_cleanup_uploads_removes_only_abandoned_ones(store):
    old, fresh = store.uploads_dir / ("aa" * 8), store.uploads_dir / ("bb" * 8)
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    tmp = files.temp_path(store.models_dir / "deadbeef.pt")
    tmp.write_bytes(b"half")
    keep = store.models_dir / (("c" * 64) + ".pt")
    keep.write_bytes(b"model")
    now = 1_000_000.0
    for p in (old, tmp, keep):
        os.utime(p, (now - 7200, now - 7200))
    os.utime(fresh, (now - 60, now - 60))
    store._busy_uploads.add("bb" * 8)
    assert sorted(store.cleanup_uploads(3600, now=now)) == sorted([old.name, tmp.name])
    store._busy_uploads.discard("bb" * 8)
    assert fresh.exists() and keep.exists()
    os.utime(fresh, (now - 7200, now - 7200))
    assert store.cleanup_uploads(3600, now=now) == [fresh.name]


def test_check_models_reports_missing_files_and_removes_orphans(tmp_path):
    store = Store(tmp_path / "data")
    good, gone = _archive(b"1"), _archive(b"2")
    for i, data in enumerate((good, gone)):
        _upload(store, f"{i}" * 16, data)
        store.finish_upload(f"{i}" * 16, hashlib.sha256(data).hexdigest())
    tok = store.put_blob(b"tok", ".tokenizer.json")
    store.save_model(_record("good", good, tok))
    store.save_model(_record("gone", gone))
    orphan = store.model_path("e" * 64)
    orphan.write_bytes(b"a file placed, its row never committed")
    store.model_path(_record("gone", gone).sha256).write_bytes(b"")  # e.g. after a power loss
    store.close()
    store = Store(tmp_path / "data")  # a restart
    try:
        problems = store.check_models()
        assert len(problems) == 1 and problems[0][0] == "gone" and "expected" in problems[0][1]
        assert not orphan.exists()
        assert store.model_path(_record("good", good).sha256).exists() and store.tokenizer_path(tok).exists()
        store.model_path(_record("gone", gone).sha256).unlink()
        missing = store.model_path(_record("gone", gone).sha256)
        assert store.check_models() == [("gone", f"model file {missing} is missing")]
    finally:
        store.close()


def test_delete_model_removes_the_row_then_unreferenced_files(store):
    data = _archive()
    _upload(store, "ab" * 8, data)
    store.finish_upload("ab" * 8, hashlib.sha256(data).hexdigest())
    tok = store.put_blob(b"tok", ".tokenizer.json")
    a, b = _record("a", data, tok), _record("b", data)
    store.save_model(a)
    store.save_model(b)
    store.delete_model(a)
    assert store.model_path(a.sha256).exists() and not store.tokenizer_path(tok).exists()
    store.delete_model(b)
    assert not store.model_path(a.sha256).exists()
    assert not list(store.load_models())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_fails_the_upload_clearly(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        store = Store(mnt)
        try:
            chunk = os.urandom(256 << 10)
            with pytest.raises(ServerError, match="no space left on device writing"):
                for i in range(8):
                    store.append_upload("ab" * 8, i * len(chunk), chunk)
            assert not list(store.uploads_dir.iterdir())
            with pytest.raises(ServerError, match="no space left on device writing"):
                store.put_blob(os.urandom(2 << 20), ".tokenizer.json")
            assert not list(store.models_dir.iterdir())
        finally:
            store.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

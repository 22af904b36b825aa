"""Durable files: write to a temporary name, fsync, rename, fsync the directory.

A file renamed into place without an fsync can be empty after a power loss even though the
rename itself survived; a directory not fsynced after a rename can lose the rename. Whoever
then commits a database row that names the file must do so only after ``durable_replace`` (or
``durable_write``) returned, so that the row never outlives its file.

Everything here blocks on the disk: on a daemon's loop thread run it through
``mlfleet.common.offload.Offload`` (small metadata operations such as one ``unlink`` are fine).

Disk errors that an operator must act on (no space, quota, read-only file system) are raised
as ``DiskFullError``, an ``OSError`` with the same ``errno`` and a message naming the path and
what was being done: ``no space left on device writing /data/models/x.part: ...``. A failed
write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

# errno -> how to say it; these need an operator (free space, raise a quota, remount), not a retry.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_tmp_ids = itertools.count(1)
_tmp_lock = threading.Lock()


class DiskFullError(OSError):
    """No space, no quota or a read-only file system: ``str(e)`` is the whole, clear message."""

    def __init__(self, err: int, message: str, filename: str | None = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.filename = filename

    def __str__(self) -> str:
        return self.message


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _DISK_ERRNOS


def disk_error(e: OSError, path: PathLike, action: str = "writing") -> OSError:
    """``e`` as a ``DiskFullError`` with a clear message if it is ENOSPC, EDQUOT or EROFS,
    else ``e`` itself: ``no space left on device writing <path>: <strerror>``."""
    if isinstance(e, DiskFullError) or e.errno not in _DISK_ERRNOS:
        return e
    detail = e.strerror or str(e)
    return DiskFullError(e.errno, f"{_DISK_ERRNOS[e.errno]} {action} {path}: {detail}", str(path))


@contextlib.contextmanager
def explain_disk_errors(path: PathLike, action: str = "writing") -> Iterator[None]:
    """Re-raise ENOSPC/EDQUOT/EROFS raised inside the block as ``DiskFullError``."""
    try:
        yield
    except OSError as e:
        clear = disk_error(e, path, action)
        if clear is e:
            raise
        raise clear from e


def temp_path(dest: PathLike, suffix: str = ".tmp") -> Path:
    """A name next to ``dest``, unique in this process: ``<dest>.<pid>-<n><suffix>``. Temporary
    files sit in the destination's directory so the final rename never crosses file systems;
    a cleanup can recognise them by ``suffix``."""
    dest = Path(dest)
    with _tmp_lock:
        n = next(_tmp_ids)
    return dest.with_name(f"{dest.name}.{os.getpid()}-{n}{suffix}")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, so that renames and creations in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """fsync a file's data and size (an fsync through any descriptor flushes the inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with explain_disk_errors(path, "syncing"):
            os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(tmp: PathLike, dest: PathLike) -> None:
    """fsync ``tmp``, rename it to ``dest`` (atomically replacing it), fsync ``dest``'s
    directory (and ``tmp``'s, if another). Once this returns, ``dest`` holds ``tmp``'s bytes
    after a power loss too."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_file(tmp)
    with explain_disk_errors(dest, "renaming into"):
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if tmp.parent.resolve() != dest.parent.resolve():
            fsync_dir(tmp.parent)


def durable_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically: readers see the old file or the
    whole new one, never a part. On any error (e.g. a full disk, raised as ``DiskFullError``)
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with explain_disk_errors(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        durable_replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def write_at(path: PathLike, offset: int, data: bytes) -> int:
    """Write ``data`` at ``offset`` of an existing file (never creates it: a file deleted
    meanwhile raises ``FileNotFoundError``). Safe from several threads at distinct offsets.
    Returns the bytes written; a full disk raises ``DiskFullError``."""
    with explain_disk_errors(path):
        fd = os.open(path, os.O_WRONLY)
        try:
            view, pos = memoryview(data), offset
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            os.close(fd)
    return len(data)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read ``chunk`` bytes at a time (1-2 s per GB: Offload it)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_at(path: PathLike, offset: int, length: int) -> tuple[bytes, int]:
    """Up to ``length`` bytes of a file from ``offset``, and the file's size."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        return os.pread(f.fileno(), length, offset), size


def unlink_quiet(path: PathLike) -> bool:
    """Remove a file if it is there; True if it was removed. Other errors are raised."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False

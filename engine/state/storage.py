"""Writes that fail because the storage refuses them: disk full, quota, read-only, no permission.

A restart cannot make space, so such a failure is not an ordinary exception: it becomes a
StorageError, reported in one line (the path, how many bytes were needed, how many are free) and
ending the run with STORAGE_FAILED (engine/resilience/exit_codes.py), which no launcher restarts.
`check_writable` refuses an unwritable directory before training starts.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from engine.state.errors import StorageError

STORAGE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


def is_storage_failure(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is an OSError a restart cannot fix."""
    return storage_cause(err) is not None


def storage_cause(err: Optional[BaseException]) -> Optional[OSError]:
    """The OSError with a storage errno inside `err` (its causes, context, DCP's per-rank failures)."""
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def free_bytes(path: str | Path) -> Optional[int]:
    """Bytes free for writing on the file system of `path` (its nearest existing ancestor)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human_bytes(count: Optional[int]) -> str:
    """'12.3 MiB' (binary units), or 'unknown'."""
    if count is None:
        return "unknown"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def storage_error(cause: OSError, what: str, path: str | Path, needed: Optional[int] = None,
                  after: str = "") -> StorageError:
    """The one-line StorageError of `cause` while writing `what` at `path`."""
    free = free_bytes(path)
    reason = STORAGE_ERRNOS.get(cause.errno, cause.strerror or str(cause))
    where = cause.filename or path
    need = f"needs about {human_bytes(needed)}, " if needed is not None else ""
    message = (f"{what} failed: {reason} ({where}: {need}{human_bytes(free)} free there){after}; "
               f"a restart cannot fix this: free space (or make it writable) and run the same command to resume")
    return StorageError(message, str(where), needed, free)


def check_writable(path: str | Path, key: str) -> None:
    """Create `path` if needed and write a probe file in it; a refusal is a ConfigError naming `key`.

    Write bits do not stop root, so the probe really writes (a read-only mount refuses it).
    """
    path = Path(path)
    probe = path / f".apogee-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        raise unwritable(err, key, path) from None


def unwritable(err: OSError, key: str, path: str | Path):
    """The ConfigError (exit 2) of a directory `key` that refused a write with `err`."""
    from engine.config import ConfigError

    reason = STORAGE_ERRNOS.get(err.errno, err.strerror or str(err))
    return ConfigError(f"{key}={str(path)!r}: not writable ({reason}: {err.filename or path}); "
                       f"give a writable directory")

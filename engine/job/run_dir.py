"""Claiming a run directory before a run writes to it: the lock, `--overwrite`, writable paths.

`claim_run_dir` runs in the process that owns the run (the launcher, or rank 0 under an outside
launcher) before anything is written: it takes RUN_DIR/run.lock (engine/job/run_lock.py), moves
an old run aside on `--overwrite` (renamed RUN_DIR.old-<time>, never deleted; a checkpoint.dir
outside the run directory goes aside with it) and refuses, with exit status 2, a run directory,
checkpoint directory or data cache that cannot be written (a read-only mount, a full quota), so
that no training starts that could not save its work.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from engine.config import ApogeeConfig, ConfigError
from engine.job.run_lock import LOCK_FILE, RunLock
from engine.state.storage import check_writable, unwritable


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return candidate


def _has_run(path: Path) -> bool:
    return path.is_dir() and any(entry.name != LOCK_FILE for entry in path.iterdir())


def move_aside(path: Path, report: Callable[[str], None]) -> Optional[Path]:
    """Rename `path` to PATH.old-<time> if it holds anything; returns the new name."""
    if not _has_run(path):
        return None
    aside = _aside_name(path)
    os.rename(path, aside)
    report(f"apogee: --overwrite: moved {path} aside to {aside} (kept, nothing deleted)")
    return aside


def claim_run_dir(out: Path, cfg: ApogeeConfig, overwrite: bool = False,
                  report: Callable[[str], None] = print) -> RunLock:
    """Lock `out` for this run (moving an old run aside first on `overwrite`) and check that the
    run can write where it must; ConfigError (exit 2) otherwise. Returns the held lock."""
    out = Path(out)
    try:  # the lock is the first thing written; a directory that refuses it refuses the run
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, report=report).acquire()
    except OSError as err:
        raise unwritable(err, "--run-dir", out) from None
    try:
        if overwrite:
            checkpoints = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
            aside = move_aside(out, report)
            if aside is not None:
                lock.moved_to(aside)
                out.mkdir(parents=True)
                fresh = RunLock(out, report=report).acquire()
                lock.release()
                lock = fresh
            if checkpoints is not None and checkpoints.resolve() != (out / "checkpoints").resolve():
                move_aside(checkpoints, report)
        check_writable(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints", "checkpoint.dir")
        check_writable(cfg.data.cache_dir, "data.cache_dir")
    except OSError as err:
        lock.release()
        raise ConfigError(f"--overwrite: cannot move {out} aside ({err.strerror or err})") from None
    except BaseException:
        lock.release()
        raise
    return lock


def remove_if_empty(out: Path) -> None:
    """Remove `out` if no file is left in it, its empty folders too (the claim's writability probes
    make checkpoints/): a run refused after its claim leaves no directory behind."""
    for folder in sorted((p for p in Path(out).rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            folder.rmdir()  # refuses, harmlessly, a folder that holds anything
        except OSError:
            pass
    try:
        Path(out).rmdir()
    except OSError:
        pass

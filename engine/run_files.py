"""A run directory's own files, written without following a symlink planted in their place.

A run directory is often shared (a project's scratch space, a Slurm job's output folder). Writing
`config.yaml` through a symlink someone left there would overwrite whatever it points at, with
the user's rights (here root). So the files Apogee writes by name in a run directory are opened
with O_NOFOLLOW: a symlink in their place is refused with an error naming it, never followed.
`check_run_files` makes the same check for all of them before any rank starts, so a planted link
stops the run with status 2 at the prompt rather than as a rank's exception mid-run.

This module imports nothing of the project: engine/config.py (config.yaml), the metrics writer
and the event log all open their files through it.
"""
from __future__ import annotations

import os
from pathlib import Path

RUN_FILES = ("config.yaml", "metrics.jsonl", "events.jsonl")
"""Files of a run directory that Apogee appends to or rewrites by name."""
RUN_FOLDERS = ("exit",)
"""Folders of a run directory that Apogee creates files in (engine/resilience/exit_records.py)."""


class RunFileError(ValueError):
    """A run directory's file cannot be written safely (a symlink in its place); exit status 2."""


def _refusal(path: Path) -> RunFileError:
    target = os.readlink(path) if path.is_symlink() else "?"
    return RunFileError(f"{path}: is a symlink (to {target}); Apogee writes its run files itself and does not "
                        f"follow links planted in a run directory: remove the link or use another --run-dir")


def open_run_file(path: str | Path, append: bool = True, readable: bool = False) -> int:
    """A write descriptor on `path` (created if missing; appended to, or truncated), never through a
    symlink; `readable`: one that can read too (the event log looks at the byte before its line)."""
    path = Path(path)
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.open(path, flags, 0o644)
    except OSError as error:
        if path.is_symlink():  # ELOOP from O_NOFOLLOW
            raise _refusal(path) from None
        raise error


def write_run_file(path: str | Path, text: str) -> None:
    """Replace the contents of `path` with `text`, never through a symlink."""
    fd = open_run_file(path, append=False)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def check_run_files(run_dir: str | Path) -> None:
    """Refuse a run directory in which one of Apogee's own files or folders is a symlink."""
    run_dir = Path(run_dir)
    for name in (*RUN_FILES, *RUN_FOLDERS):
        if (run_dir / name).is_symlink():
            raise _refusal(run_dir / name)

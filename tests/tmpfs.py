"""A small tmpfs mounted for one test: a disk that fills up, or a read-only file system (tests run
as root, where permission bits do not stop writes). Skips the test where mounting is not allowed."""
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(path: Path, options: str = "size=12m"):
    """Mount a tmpfs with `options` (e.g. "size=12m", "ro,size=1m") at `path`, yield it, unmount it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)

"""Publishing checkpoints atomically, and finding the newest good one.

A checkpoint directory is written under a temporary name (`step_00000120.partial-<id>`), then
published by rank 0 in an order that never exposes a torn checkpoint:

    write every file -> fsync them -> manifest.json (size and SHA-256 of every file) -> fsync
    -> rename to step_00000120 -> fsync the parent -> `latest` (written to a temp file, renamed)

A crash at any point leaves either the previous `latest` or the new one, both complete. Loading
verifies the manifest (every file present, sizes and checksums equal); a checkpoint that fails
is reported and skipped, and the newest older one that passes is used instead. Old checkpoints
beyond `keep` are deleted only after the new one is published.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the reason."""


@dataclass
class CheckpointInfo:
    """A published checkpoint: its directory and the step it holds."""

    path: Path
    step: int


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


class CheckpointStore:
    """The checkpoint directory of a run: partial writes, atomic publish, retention and discovery."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    # -- writing ------------------------------------------------------------------------------

    def new_partial(self, step: int, token: Optional[str] = None) -> Path:
        """A fresh temporary directory for the checkpoint of `step` (token shared by all ranks)."""
        token = token or uuid.uuid4().hex[:12]
        path = self.root / f"{step_dir_name(step)}.partial-{token}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"checkpoint.dir={self.root}: cannot create {path.name} ({err.strerror})") from None
        return path

    def publish(self, partial: Path, step: int, metadata: Optional[dict] = None) -> CheckpointInfo:
        """Checksum, fsync and rename `partial` into place, then point `latest` at it (rank 0 only)."""
        final = self.root / step_dir_name(step)
        try:
            files = _data_files(partial)
            for path in files:
                _fsync_path(path)
            manifest = {"step": step, "metadata": metadata or {},
                        "files": {str(p.relative_to(partial)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                  for p in files}}
            self._write_durably(partial / MANIFEST, json.dumps(manifest, indent=1))
            _fsync_path(partial)
            if final.exists():  # a re-run of the same step (after a rewind): replace it whole
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_path(self.root)
            self._write_durably(self.root / LATEST, final.name + "\n", atomic=True)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"checkpoint.dir={self.root}: publishing step {step} failed "
                                  f"({err.strerror or err}); earlier checkpoints are untouched") from None
        self._apply_retention(final)
        return CheckpointInfo(final, step)

    def _write_durably(self, path: Path, text: str, atomic: bool = False) -> None:
        target = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}") if atomic else path
        with open(target, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
            _fsync_path(path.parent)

    def _apply_retention(self, newest: Path) -> None:
        published = self.published()
        for info in published[:-self.keep] if len(published) > self.keep else []:
            if info.path != newest:
                shutil.rmtree(info.path, ignore_errors=True)
        for stale in self.root.glob("step_*.partial-*"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)

    def discard(self, partial: Path) -> None:
        """Remove a partial checkpoint that will not be published."""
        shutil.rmtree(partial, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------

    def published(self) -> list[CheckpointInfo]:
        """Published checkpoint directories, oldest first (verified or not)."""
        if not self.root.is_dir():
            return []
        found = [CheckpointInfo(p, int(m.group(1))) for p in self.root.iterdir()
                 if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return sorted(found, key=lambda info: info.step)

    def latest_pointer(self) -> Optional[Path]:
        """The directory `latest` names, if any."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        return self.root / pointer.read_text().strip()

    def latest_good(self, report: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
        """The newest checkpoint that passes verification, starting from `latest`; None if none.

        Each checkpoint that fails is reported through `report` with the reason.
        """
        candidates = self.published()
        pointed = self.latest_pointer()
        if pointed is not None:  # `latest` first; newer unpublished-by-pointer dirs are not trusted
            candidates = [c for c in candidates if c.step <= _step_of(pointed)] or candidates
        for info in reversed(candidates):
            problem = verify(info.path)
            if problem is None:
                return info
            report(f"checkpoint {info.path} is not usable ({problem}); trying an older one")
        return None


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def verify(path: str | Path) -> Optional[str]:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        return f"manifest.json is corrupt ({err})"
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def read_manifest(path: str | Path) -> dict:
    """The manifest of a published checkpoint (step, metadata, files)."""
    return json.loads((Path(path) / MANIFEST).read_text())


def resolve_checkpoint(source: str | Path, key: str) -> Path:
    """The checkpoint that a command's `key` (train.init_from, midtrain.branch_from, --resume,
    --checkpoint) names: a step_* directory itself, or a run's checkpoints/ folder or run
    directory, meaning its newest intact checkpoint. CheckpointError names the key otherwise
    (its `reason` attribute holds the reason alone)."""
    path = Path(source)

    def refuse(reason: str):
        error = CheckpointError(f"{key}={str(source)!r}: not an intact checkpoint ({reason})")
        error.reason = reason
        return error

    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        problem = verify(path) if path.is_dir() else "no such directory"
        if problem is not None:
            raise refuse(problem)
        return path
    for root in (path, path / "checkpoints"):
        store = CheckpointStore(root)
        if store.published() or store.latest_pointer() is not None:
            found = store.latest_good(report=lambda _: None)
            if found is None:
                raise refuse(f"no intact checkpoint in {root}")
            return found.path
    raise refuse("no such directory" if not path.is_dir() else "neither a checkpoint (manifest.json) nor a folder of them")

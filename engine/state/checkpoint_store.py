"""Publishing checkpoints atomically, and finding the newest intact one.

A checkpoint directory is written under a temporary name (`step_00000120.partial-<id>`): every
rank writes and fsyncs its files and hashes them (engine/state/manifest.py); rank 0 then
publishes in an order that never exposes a torn checkpoint:

    manifest.json (every rank's digests, merged) -> fsync -> rename to step_00000120
    -> fsync the parent -> `latest` (written to a temp file, renamed)

A crash at any point leaves the previous checkpoints and either no new one or a complete one; a
failed write removes its partial directory. The checkpoint to continue from is the newest intact
one whatever `latest` says (a crash between the rename and `latest`, or a `latest` naming a step
that is gone, is reported and does not hide newer intact checkpoints): intact means its manifest
parses and every file it lists is there with its size and SHA-256. Retention removes old
checkpoints beyond `keep` only after a new one is published, and never the newest intact one.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from engine.state.errors import CheckpointError, StorageError  # noqa: F401  (re-exported: callers import them here)
from engine.state.manifest import (MANIFEST, ManifestError, check_sizes, fsync_path, hash_files, load_manifest,
                                   manifest_text, no_progress, verify_files)
from engine.state.storage import storage_cause, storage_error

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class CheckpointInfo:
    """A published checkpoint: its directory and the step it holds."""

    path: Path
    step: int


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:08d}"


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
            cause = storage_cause(err)
            if cause is not None:
                raise storage_error(cause, f"checkpoint of step {step}", path) from None
            raise CheckpointError(f"checkpoint.dir={self.root}: cannot create {path.name} ({err.strerror})") from None
        return path

    def publish(self, partial: Path, step: int, metadata: Optional[dict] = None,
                digests: Optional[dict[str, dict]] = None, needed: Optional[int] = None) -> CheckpointInfo:
        """Write the manifest of `partial` (`digests`: every rank's, merged), rename it into place
        and point `latest` at it (rank 0 only). Files no rank hashed are hashed here."""
        final = self.root / step_dir_name(step)
        aside = None
        try:
            on_disk = {str(p.relative_to(partial)) for p in _data_files(partial)}
            files = {name: entry for name, entry in (digests or {}).items()}
            lost = sorted(files.keys() - on_disk)
            if lost:
                raise CheckpointError(f"checkpoint.dir={self.root}: step {step}: {', '.join(lost[:3])} written by "
                                      f"rank {files[lost[0]].get('rank')} is missing from {partial.name}")
            files.update(hash_files(partial, on_disk - files.keys(), rank=0))
            self._write_durably(partial / MANIFEST, manifest_text(step, metadata or {}, files))
            fsync_path(partial)
            if final.exists():  # the same step again (after a rewind): the old one stays until the new is in place
                aside = final.with_name(f"{final.name}.replaced-{uuid.uuid4().hex[:8]}")
                os.rename(final, aside)
            os.rename(partial, final)
            fsync_path(self.root)
        except (OSError, CheckpointError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            if aside is not None and not final.exists():
                os.rename(aside, final)
            if isinstance(err, CheckpointError):
                raise
            cause = storage_cause(err)
            if cause is not None:
                raise storage_error(cause, f"publishing the checkpoint of step {step}", partial, needed,
                                    after="; the partial checkpoint was removed, earlier ones are untouched") from None
            raise CheckpointError(f"checkpoint.dir={self.root}: publishing step {step} failed "
                                  f"({err.strerror or err}); earlier checkpoints are untouched") from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        try:
            self._write_durably(self.root / LATEST, final.name + "\n", atomic=True)
        except OSError as err:  # the checkpoint is complete; resuming finds it without `latest`
            print(f"apogee: warning: {final} is published but `latest` could not be updated "
                  f"({err.strerror or err}); the newest intact checkpoint is used on resume", flush=True)
        self._apply_retention(CheckpointInfo(final, step))
        return CheckpointInfo(final, step)

    def _write_durably(self, path: Path, text: str, atomic: bool = False) -> None:
        target = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:8]}") if atomic else path
        try:
            with open(target, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if atomic:
                os.replace(target, path)
                fsync_path(path.parent)
        except OSError:
            if atomic:
                target.unlink(missing_ok=True)
            raise

    def _apply_retention(self, newest: CheckpointInfo) -> None:
        """Keep `newest` and the keep - 1 checkpoints before it; never one of a later step (that
        is not this run's to judge) and never `newest`, the one just published and intact."""
        older = [info for info in self.published() if info.step < newest.step]
        for info in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(info.path, ignore_errors=True)
        for stale in [*self.root.glob("step_*.partial-*"), *self.root.glob("step_*.replaced-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of interrupted saves

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
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError:
            return None
        return self.root / name if name else None

    def latest_good(self, report: Callable[[str], None] = print,
                    check: Optional[Callable[[Path], Optional[str]]] = None) -> Optional[CheckpointInfo]:
        """The newest checkpoint that passes `check` (default: full verification), whatever
        `latest` says; None if none. Each one that fails is reported with the reason, and so is a
        `latest` that names another checkpoint than the one chosen."""
        check = check or verify
        for info in reversed(self.published()):
            problem = check(info.path)
            if problem is None:
                pointed = self.latest_pointer()
                if pointed is not None and pointed.name != info.path.name:
                    state = "" if pointed.is_dir() else ", which does not exist"
                    report(f"`latest` names {pointed.name}{state}, but the newest intact checkpoint is "
                           f"{info.path.name}: using {info.path.name}")
                return info
            report(f"checkpoint {info.path} is not usable ({problem}); trying an older one")
        return None

    def newest_bytes(self) -> Optional[int]:
        """Size of the newest published checkpoint (an estimate of what the next one needs)."""
        for info in reversed(self.published()):
            try:
                return sum(p.stat().st_size for p in info.path.rglob("*") if p.is_file())
            except OSError:
                continue
        return None


def verify(path: str | Path, hashes: bool = True, progress: Callable[[], None] = no_progress) -> Optional[str]:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it.

    With hashes=False only the manifest and the files' sizes are checked (no file is read): the
    quick check made before the ranks start, which then verify the checksums between them.
    """
    path = Path(path)
    try:
        manifest = load_manifest(path)
    except ManifestError as err:
        return str(err)
    problem = check_sizes(path, manifest)
    if problem is not None or not hashes:
        return problem
    return verify_files(path, manifest, manifest["files"], progress)


def quick_check(path: Path) -> Optional[str]:
    """`verify` without reading the files: the manifest and every file's size."""
    return verify(path, hashes=False)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a published checkpoint (format, step, metadata, files); CheckpointError if corrupt."""
    try:
        return load_manifest(path)
    except ManifestError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


LEGACY_MODEL_FIELDS = {"make_vocab_size_divisible_by": 1}
"""Model fields added after checkpoints were first written, with the value that describes how a
checkpoint recorded without them was built (no vocabulary padding before the field existed): an
older checkpoint is read as the model it holds, never as another one."""


def recorded_model(record: dict) -> dict:
    """A checkpoint manifest's model record with the fields it predates filled (LEGACY_MODEL_FIELDS)."""
    return {**LEGACY_MODEL_FIELDS, **record}


def resolve_checkpoint(source: str | Path, key: str, hashes: bool = True) -> Path:
    """The checkpoint that a command's `key` (train.init_from, midtrain.branch_from, --resume,
    --checkpoint) names: a step_* directory itself, or a run's checkpoints/ folder or run
    directory, meaning its newest intact checkpoint. CheckpointError names the key otherwise
    (its `reason` attribute holds the reason alone). hashes=False checks sizes only (see verify)."""
    path = Path(source)

    def check(candidate: Path) -> Optional[str]:
        return verify(candidate, hashes=hashes)

    def refuse(reason: str):
        error = CheckpointError(f"{key}={str(source)!r}: not an intact checkpoint ({reason})")
        error.reason = reason
        return error

    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        problem = check(path) if path.is_dir() else "no such directory"
        if problem is not None:
            raise refuse(problem)
        return path
    for root in (path, path / "checkpoints"):
        store = CheckpointStore(root)
        if store.published() or store.latest_pointer() is not None:
            found = store.latest_good(report=lambda _: None, check=check)
            if found is None:
                raise refuse(f"no intact checkpoint in {root}")
            return found.path
    raise refuse("no such directory" if not path.is_dir() else "neither a checkpoint (manifest.json) nor a folder of them")

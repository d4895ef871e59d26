"""Which checkpoint a run starts from, and whether it may: `--resume auto|never|PATH`.

`auto` (the default) continues from the newest intact checkpoint of the run directory, whatever
`latest` says; when the run directory has checkpoints but none is intact, the run stops (exit 2)
listing what it found instead of silently starting over them. `never` starts fresh, and is refused
(exit 2) where checkpoints exist: a new --run-dir or `--overwrite` (the old run moved aside) starts
over. A path names one checkpoint directory, or a run's checkpoints/ folder (its newest intact
checkpoint). A checkpoint must hold the same model (the differing fields are named) and, unless
checkpoint.allow_other_run is set, come from this run (its run id, kept in RUN_DIR/run_id, is
written into every manifest).

Before the ranks start, the launcher checks a candidate's manifest and file sizes and reads its
DCP metadata through the restricted unpickler; the ranks then verify the checksums between them,
each its share of the files (`newest_intact_for_all`), so verifying costs each rank about its own bytes.
"""
from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Callable, Optional

from engine.config import ApogeeConfig, ConfigError, ModelConfig
from engine.state.checkpoint_store import (CheckpointError, CheckpointInfo, CheckpointStore, quick_check,
                                           read_manifest, recorded_model, resolve_checkpoint, verify)
from engine.state.manifest import ManifestError, load_manifest, no_progress, verification_share, verify_files
from engine.state.safe_load import read_metadata
from parallel.collectives import Group, all_gather_objects, broadcast_objects

START_OVER = ("to start over, give a new --run-dir, or add --overwrite to move the old run aside "
              "(it is kept, renamed, never deleted)")


def run_id(run_dir: Path) -> str:
    """This run's id: created on the first start (by the launcher, before any rank reads it), then
    read back on every restart and resume. Created whole or not at all: a reader never sees it half
    written, and of two creators one wins."""
    path = Path(run_dir) / "run_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"run_id.tmp-{uuid.uuid4().hex[:8]}")
        temp.write_text(uuid.uuid4().hex[:16] + "\n")
        try:
            os.link(temp, path)  # fails if another process created it first: theirs stands
        except FileExistsError:
            pass
        finally:
            temp.unlink()
    return path.read_text().strip()


def checkpoint_store(cfg: ApogeeConfig, run_dir: Path) -> CheckpointStore:
    """The run's checkpoint directory (checkpoint.dir, default RUN_DIR/checkpoints)."""
    return CheckpointStore(cfg.checkpoint.dir or Path(run_dir) / "checkpoints", keep=cfg.checkpoint.keep)


def _none_intact(store: CheckpointStore, found: list[str]) -> CheckpointError:
    listing = "; ".join(found) or ", ".join(info.path.name for info in store.published())
    return CheckpointError(f"{store.root} has checkpoints but none is intact ({listing}); nothing was started. "
                           f"Repair or remove them, resume from elsewhere with --resume PATH, or {START_OVER}")


def choose_checkpoint(resume: str, store: CheckpointStore, report: Callable[[str], None] = print,
                      hashes: bool = True) -> Optional[CheckpointInfo]:
    """The checkpoint `--resume` selects (None: start fresh); a named one must be intact.

    hashes=False (the launcher, before the ranks verify the checksums) checks manifests and sizes only.
    """
    if resume == "never":
        if store.published():
            steps = ", ".join(str(info.step) for info in store.published())
            raise CheckpointError(f"--resume never: {store.root} already holds checkpoints (steps {steps}); "
                                  f"starting fresh there would overwrite them: {START_OVER}")
        return None
    if resume == "auto":
        found: list[str] = []

        def check(path: Path) -> Optional[str]:
            problem = verify(path, hashes=hashes)
            if problem is not None:
                found.append(f"{path.name}: {problem}")
            return problem
        info = store.latest_good(report, check=check)
        if info is None and store.published():
            raise _none_intact(store, found)
        return info
    path = resolve_checkpoint(resume, "--resume", hashes=hashes)  # a step_* directory, or a folder: its newest intact
    return CheckpointInfo(path, int(read_manifest(path)["step"]))


def check_loadable(path: Path) -> None:
    """Read the checkpoint's DCP metadata through the restricted unpickler (UnsafeCheckpointError
    names the file if it would run code): before any rank starts."""
    read_metadata(path)


def check_compatible(info: CheckpointInfo, cfg: ApogeeConfig, this_run: str) -> None:
    """Refuse a checkpoint of a different model, or of another run unless allowed."""
    saved = read_manifest(info.path)["metadata"]
    model = recorded_model(saved["model"]) if isinstance(saved.get("model"), dict) else {}
    current = dataclasses.asdict(cfg.model)
    # The padding divisor counts by what it builds (the rows held): an older checkpoint (no
    # padding recorded) of a vocabulary already divisible is the same model.
    padding = "make_vocab_size_divisible_by"
    differing = [f"model.{k}: checkpoint {model.get(k)!r}, config {v!r}" for k, v in current.items()
                 if k != padding and model.get(k) != v]
    if not differing and model:
        rows = ModelConfig(**model).padded_vocab_size
        if rows != cfg.model.padded_vocab_size:
            differing.append(f"model.{padding}: checkpoint {model[padding]!r} ({rows} embedding rows), config "
                             f"{cfg.model.make_vocab_size_divisible_by!r} ({cfg.model.padded_vocab_size} rows); "
                             f"set model.{padding}={model[padding]} to continue it")
    if differing:
        raise CheckpointError(f"checkpoint {info.path} holds a different model: " + "; ".join(differing))
    if saved.get("run_id") != this_run and not cfg.checkpoint.allow_other_run:
        raise CheckpointError(f"checkpoint {info.path} belongs to run {saved.get('run_id')}, not this run "
                              f"({this_run}); set checkpoint.allow_other_run=true to start from it anyway")


def check_steps_beyond(start_step: int, cfg: ApogeeConfig, source: Optional[Path]) -> None:
    """Refuse a run that would train nothing: train.steps not beyond the step it starts from."""
    if start_step >= cfg.train.steps:
        where = f" ({source})" if source is not None else ""
        raise ConfigError(f"train.steps={cfg.train.steps}: the run starts from step {start_step}{where}, so there "
                          f"is nothing to train; set train.steps above {start_step} to continue it")


def intact_for_all(path: Path, group: Optional[Group], rank: int,
                   progress: Callable[[], None] = no_progress) -> Optional[str]:
    """None if the checkpoint at `path` is intact, as every rank of `group` finds by verifying its
    share of the files (the same answer on all of them); else the first problem found."""
    world = group.size if group is not None else 1
    try:
        manifest = load_manifest(path)
        problem = verify_files(path, manifest, verification_share(manifest, rank, world), progress)
    except ManifestError as err:
        problem = str(err)
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    problems = all_gather_objects(problem, group, purpose="checkpoint") if group is not None else [problem]
    return next((p for p in problems if p is not None), None)


def newest_intact_for_all(store: CheckpointStore, group: Optional[Group], rank: int,
                          progress: Callable[[], None] = no_progress, report: Callable[[str], None] = print,
                          found: Optional[list[str]] = None) -> Optional[CheckpointInfo]:
    """The newest intact checkpoint of `store`, whatever `latest` says, chosen together by every
    rank (each verifies its share of the files); None if none. Problems go to `report` and `found`."""
    found = [] if found is None else found
    candidates: list = [None]
    if rank == 0:
        listed = []
        for info in reversed(store.published()):  # manifest and sizes first: no hashing for a torn one
            problem = quick_check(info.path)
            if problem is None:
                listed.append((str(info.path), info.step))
            else:
                report(f"checkpoint {info.path} is not usable ({problem}); trying an older one")
                found.append(f"{info.path.name}: {problem}")
        candidates[0] = listed
    if group is not None:
        broadcast_objects(candidates, group, purpose="checkpoint")
    for path, step in candidates[0]:
        problem = intact_for_all(Path(path), group, rank, progress)
        if problem is None:
            pointed = store.latest_pointer() if rank == 0 else None
            if pointed is not None and pointed.name != Path(path).name:
                report(f"`latest` names {pointed.name}{'' if pointed.is_dir() else ', which does not exist'}, "
                       f"but the newest intact checkpoint is {Path(path).name}: using {Path(path).name}")
            return CheckpointInfo(Path(path), step)
        report(f"checkpoint {path} is not usable ({problem}); trying an older one")
        found.append(f"{Path(path).name}: {problem}")
    return None


def choose_for_all(resume: str, store: CheckpointStore, group: Optional[Group], rank: int,
                   progress: Callable[[], None] = no_progress,
                   report: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
    """What `choose_checkpoint` selects, chosen by every rank together with the checksums verified
    between them; the same result (or the same CheckpointError) on every rank."""
    if resume == "never":
        return None
    if resume == "auto":
        found: list[str] = []
        info = newest_intact_for_all(store, group, rank, progress, report, found)
        if info is None and store.published():
            raise _none_intact(store, found)
        return info
    named: list = [None]
    if rank == 0:
        try:
            named[0] = ("ok", str(resolve_checkpoint(resume, "--resume", hashes=False)))
        except CheckpointError as err:
            named[0] = ("error", str(err))
    if group is not None:
        broadcast_objects(named, group, purpose="checkpoint")
    kind, value = named[0]
    if kind == "error":
        raise CheckpointError(value)
    problem = intact_for_all(Path(value), group, rank, progress)
    if problem is not None:
        raise CheckpointError(f"--resume={resume!r}: not an intact checkpoint ({problem})")
    return CheckpointInfo(Path(value), int(read_manifest(value)["step"]))

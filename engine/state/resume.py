"""Which checkpoint a run starts from, and whether it may: `--resume auto|never|PATH`.

`auto` (the default) continues from the newest intact checkpoint of the run directory, if any;
`never` starts fresh; a path names one checkpoint directory, or a run's checkpoints/ folder (its
newest intact checkpoint). A checkpoint must hold the same
model (the differing fields are named) and, unless checkpoint.allow_other_run is set, come from
this run (its run id, kept in RUN_DIR/run_id, is written into every manifest).
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Callable, Optional

from engine.state.checkpoint_store import (CheckpointError, CheckpointInfo, CheckpointStore, read_manifest,
                                           resolve_checkpoint)
from engine.config import ApogeeConfig


def run_id(run_dir: Path) -> str:
    """This run's id: created on the first start, then read back on every restart and resume."""
    path = Path(run_dir) / "run_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


def checkpoint_store(cfg: ApogeeConfig, run_dir: Path) -> CheckpointStore:
    """The run's checkpoint directory (checkpoint.dir, default RUN_DIR/checkpoints)."""
    return CheckpointStore(cfg.checkpoint.dir or Path(run_dir) / "checkpoints", keep=cfg.checkpoint.keep)


def choose_checkpoint(resume: str, store: CheckpointStore,
                      report: Callable[[str], None] = print) -> Optional[CheckpointInfo]:
    """The checkpoint `--resume` selects (None: start fresh); a named one must be intact."""
    if resume == "never":
        return None
    if resume == "auto":
        return store.latest_good(report)
    path = resolve_checkpoint(resume, "--resume")  # a step_* directory, or a folder of them: its newest intact
    return CheckpointInfo(path, int(read_manifest(path)["step"]))


def check_compatible(info: CheckpointInfo, cfg: ApogeeConfig, this_run: str) -> None:
    """Refuse a checkpoint of a different model, or of another run unless allowed."""
    saved = read_manifest(info.path)["metadata"]
    current = dataclasses.asdict(cfg.model)
    differing = [f"model.{k}: checkpoint {saved['model'].get(k)!r}, config {v!r}"
                 for k, v in current.items() if saved.get("model", {}).get(k) != v]
    if differing:
        raise CheckpointError(f"checkpoint {info.path} holds a different model: " + "; ".join(differing))
    if saved.get("run_id") != this_run and not cfg.checkpoint.allow_other_run:
        raise CheckpointError(f"checkpoint {info.path} belongs to run {saved.get('run_id')}, not this run "
                              f"({this_run}); set checkpoint.allow_other_run=true to start from it anyway")

"""How a rank resumes: from the memory snapshots after a restart (engine/state/memory_snapshots.py),
else from the checkpoint `--resume` selects (engine/state/resume.py), recording the 'resume' event
with its source and, after a failure, the work lost."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from engine.config import ApogeeConfig
from engine.resilience.recovery import work_lost
from engine.state.checkpoint import Checkpointer
from engine.state.resume import check_compatible, choose_for_all, run_id
from parallel.collectives import broadcast_objects


def resume_trainer(trainer, checkpointer: Checkpointer, cfg: ApogeeConfig, resume: str, run_dir: Path,
                   failed_at: Optional[float] = None, restarted: bool = False) -> int:
    """Load the checkpoint `--resume` selects into `trainer`; returns the step to start from.

    Every rank verifies its share of the candidate's files and the answers are combined, so every
    rank loads the same checkpoint and each reads about its own bytes (engine/state/resume.py).
    After a failure (`failed_at`, its time, known to rank 0), the 'resume' event also records the
    work lost. A restart (`restarted`, on every rank) first tries the memory snapshots.
    """
    rank = trainer.ctx.rank
    if restarted and resume == "auto" and getattr(checkpointer, "memory", None) is not None:
        restored = _resume_from_memory(trainer, checkpointer, run_dir, failed_at)
        if restored is not None:
            return restored
    info = choose_for_all(resume, checkpointer.store, checkpointer.group, rank, checkpointer.progress,
                          report=print if rank == 0 else (lambda _: None))
    if info is not None:
        check_compatible(info, cfg, run_id(run_dir))  # every rank reads the same manifest: the same answer
    lost = work_lost(run_dir, info.step if info else 0, failed_at) if failed_at is not None else {}
    if info is None:
        if lost and rank == 0:  # a restart with no checkpoint yet: from scratch
            trainer.events.record("resume", step=0, path=None, **lost)
        return 0
    checkpointer.load(trainer, info.path)  # also restores the skip list and the guard's history
    if rank == 0:
        trainer.events.record("resume", step=info.step, path=str(info.path), source="disk", **lost)
        print(f"apogee: resumed from {info.path} (step {info.step})", flush=True)
    return info.step


def _resume_from_memory(trainer, checkpointer: Checkpointer, run_dir: Path,
                        failed_at: Optional[float]) -> Optional[int]:
    """After a failure: the newest complete set of memory snapshots, if at least as new as the disk's
    newest checkpoint (engine/state/memory_snapshots.py); its step, or None (the disk decides)."""
    rank = trainer.ctx.rank
    newest = [max((i.step for i in checkpointer.store.published()), default=0) if rank == 0 else 0]
    if checkpointer.group is not None:
        broadcast_objects(newest, checkpointer.group, purpose="checkpoint")
    restored = checkpointer.memory.restore(trainer, checkpointer.group, newest[0])
    if restored is None:
        return None
    step, keepers = restored
    if rank == 0:
        lost = work_lost(run_dir, step, failed_at, checkpointer.memory.last_taken_at) if failed_at is not None else {}
        trainer.events.record("resume", step=step, path=None, source="memory", keepers=keepers, **lost)
        print(f"apogee: resumed from the memory snapshots of step {step} (keepers by rank: {', '.join(keepers)}; "
              f"newest disk checkpoint: step {newest[0]})", flush=True)
    return step

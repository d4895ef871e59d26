"""Exit statuses of an Apogee rank, in one place: launchers and job scripts decide on them.

The launcher (engine/job/launch.py) restarts all ranks, and the Slurm job script requeues the job,
on the statuses that a restart can fix, and stops on the others (slurm/apogee.sbatch, README).

| status | meaning                                                  | restart / requeue |
|--------|----------------------------------------------------------|-------------------|
| 0      | finished                                                 | no                |
| 1      | an exception in a rank (a bug, or an injected `raise`)   | yes               |
| 2      | bad config or input, caught before training              | no                |
| 16     | Megatron's "resume to disambiguate" (re-run elsewhere)   | yes               |
| 17     | Megatron's "fault diagnosed, stop"                       | no                |
| 18     | hang: the watchdog saw no progress for hang_timeout_s    | yes               |
| 19     | stopped on request (time limit): checkpoint written      | yes (always)      |
| 20     | storage refused a write (disk full, read-only, quota)    | no                |
| 128+n  | killed by signal n (137: SIGKILL, e.g. an injected kill) | yes               |
"""
from __future__ import annotations

OK = 0
EXCEPTION = 1
CONFIG_ERROR = 2
RESUME_TO_DISAMBIGUATE = 16  # Megatron's convention, kept so that existing job scripts understand it
FAULT_DIAGNOSED = 17  # Megatron's convention: a restart would hit the same fault
HANG_DETECTED = 18  # next to Megatron's 16/17: the hang watchdog ended the rank
PREEMPTED = 19  # SIGUSR1 (Slurm's pre-timeout signal): checkpointed and stopped, requeue to continue
STORAGE_FAILED = 20  # a checkpoint or log write was refused (ENOSPC, EROFS, EDQUOT...): a restart cannot make space
SIGNAL_BASE = 128  # a rank killed by signal n exits 128 + n, the way a shell reports it

NO_RESTART = (OK, CONFIG_ERROR, FAULT_DIAGNOSED, STORAGE_FAILED)


def restart_helps(status: int) -> bool:
    """Whether restarting the job from its latest checkpoint can fix a failure with this status."""
    return status not in NO_RESTART


def describe(status: int) -> str:
    """A few words for an exit status, for logs and events."""
    names = {OK: "finished", EXCEPTION: "exception", CONFIG_ERROR: "config error",
             RESUME_TO_DISAMBIGUATE: "resume to disambiguate", FAULT_DIAGNOSED: "fault diagnosed",
             HANG_DETECTED: "hang detected", PREEMPTED: "stopped on request (checkpointed)",
             STORAGE_FAILED: "storage refused a write: disk full or read-only"}
    if status in names:
        return names[status]
    if status > SIGNAL_BASE:
        import signal
        try:
            return f"killed by {signal.Signals(status - SIGNAL_BASE).name}"
        except ValueError:
            return f"killed by signal {status - SIGNAL_BASE}"
    return f"exit status {status}"

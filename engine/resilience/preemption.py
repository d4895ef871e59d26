"""Stopping on request: checkpoint and exit so that the job can be requeued and resume.

Slurm warns a job before its time limit with a signal (`#SBATCH --signal=B:USR1@90` in
slurm/apogee.sbatch, which forwards it to the ranks), and operators can send the same with
`scancel --signal=USR1 --batch JOB`. A `StopRequest` turns SIGUSR1 into a flag; after each step
the ranks agree on it (one 8-byte all-reduce on the step's device: the signal may reach ranks at different steps), and
the trainer then writes a checkpoint, records a `preempted` event and exits with PREEMPTED (19),
on which the job script requeues the job; the requeued run resumes from that checkpoint bit for bit.
"""
from __future__ import annotations

import signal

from parallel.collectives import Group, all_reduce_values


class Preempted(Exception):
    """Raised by the trainer after the stop checkpoint is written; the rank exits with PREEMPTED."""


class StopRequest:
    """A flag that SIGUSR1 sets (the handler only sets it; the step loop acts on it)."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.requested = False
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, world: Group) -> bool:
        """Whether any rank has been asked to stop (a collective: every rank calls it each step)."""
        self.requested = bool(all_reduce_values([1 if self.requested else 0], world)[0])
        return self.requested

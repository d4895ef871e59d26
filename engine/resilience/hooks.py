"""What the runner plugs into a trainer: fault injection, the hang watchdog, stop-on-signal and the
step guard, handed to the Trainer's constructor in one object (all optional: a bare trainer has none)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass
class ResilienceHooks:
    """The resilience parts a trainer's loop calls (engine/train/loop.py); None means not used."""

    fault_injector: Optional[object] = None
    """engine.resilience.faults.FaultInjector: fires rehearsed faults before each step."""
    heartbeat: Optional[object] = None
    """engine.resilience.watchdog.Watchdog: beaten after every step (and checkpoint)."""
    stop_request: Optional[object] = None
    """engine.resilience.preemption.StopRequest: SIGUSR1 -> checkpoint, stop, requeue."""
    make_guard: Optional[Callable] = None
    """trainer -> engine.resilience.guard.StepGuard, called once the trainer is built (the guard
    fingerprints the trainer's own gradient buffers and parameters)."""
    make_stragglers: Optional[Callable] = None
    """trainer -> engine.resilience.stragglers.StragglerDetector (None: no per-step comparison)."""

    @classmethod
    def for_run(cls, cfg, rank: int, run_dir: str | Path) -> "ResilienceHooks":
        """Every part, as a run under `apogee <stage>` uses them."""
        from engine.resilience.faults import FaultInjector
        from engine.resilience.guard import StepGuard
        from engine.resilience.preemption import StopRequest
        from engine.resilience.stragglers import StragglerDetector
        from engine.resilience.watchdog import Watchdog

        injector = FaultInjector.from_config(cfg, rank, run_dir)
        return cls(fault_injector=injector, stop_request=StopRequest(),
                   heartbeat=Watchdog(run_dir, rank, cfg.resilience.hang_timeout_s).start(),
                   make_guard=lambda trainer: StepGuard(cfg.resilience, trainer, trainer.world, injector,
                                                        trainer.events),
                   make_stragglers=(lambda trainer: StragglerDetector(cfg.resilience.straggler_factor, trainer.world,
                                                                      trainer.events, trainer.ctx.rank))
                   if cfg.resilience.straggler_factor > 0 else None)

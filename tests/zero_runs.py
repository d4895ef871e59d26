"""Train ZeRO layouts with the parity tooling and collect what the ZeRO tests check.

Like tests/parity.py's `train_layouts`, but each run also returns per-rank memory figures, the
sharded optimizer state, the shard layout's sizes, and gathers stage-3 parameters before reading
the weights (they are freed outside forward/backward).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from tests.noise_floor import Reordered
from tests.parity import FakeData, _distributed_context, parity_config


@dataclass
class ZeroRun:
    """One layout's results: losses and weights from rank 0, the rest per rank."""

    losses: list[float]
    state_dict: dict
    ledgers: list[dict] = field(default_factory=list)
    """Per rank: {(group, op): bytes} of the last step."""
    memory: list[dict] = field(default_factory=list)
    """Per rank: memory_bytes() after the last step."""
    metrics: list[dict] = field(default_factory=list)
    """Per rank: the mem_* keys of the trainer's metrics record."""
    optimizer_state: list[dict] = field(default_factory=list)
    """Per rank: sharded_optimizer_state() as {name: {key: (global_shape, offset, numpy) or step}}."""
    padded_numel: list[int] = field(default_factory=list)
    """Per rank: elements of the padded flat layout (Psi plus padding); 0 at zero=0."""
    num_microbatches: int = 0


def _portable(state: dict) -> dict:
    """Sharded optimizer state with numpy arrays (tensors die with the rank's shared memory)."""
    out = {}
    for name, entry in state.items():
        out[name] = {k: (v.global_shape, v.offset, v.local.detach().float().numpy()) if hasattr(v, "local") else v
                     for k, v in entry.items()}
    return out


def _unpermuted(optimizer_state: dict, floor: Reordered) -> dict:
    """A single rank's optimizer state (every piece whole) in the reference's feature order."""
    def whole(name, piece):
        value = floor.state({name: piece.local.reshape(piece.global_shape)})[name]
        return dataclasses.replace(piece, local=value.reshape(-1))

    return {name: {k: whole(name, v) if hasattr(v, "local") else v for k, v in entry.items()}
            for name, entry in optimizer_state.items()}


def _run(overrides: list[str], world_size: int, steps: int, ctx_factory, reordered: Optional[str] = None) -> ZeroRun:
    from engine.train.grad_sync import memory_bytes, sharded_optimizer_state
    from engine.model.parallelize import gather_full_state_dict
    from engine.train.trainer import Trainer

    cfg = parity_config(overrides, world_size, steps)
    ctx = ctx_factory(cfg)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg))
    floor = Reordered(trainer, reordered) if reordered else None
    results = [trainer.train_step(step, floor.microbatches(step, trainer.microbatches(step)) if floor else None)
               for step in range(steps)]
    ledger = dict(trainer.ledger.bytes)
    gathered = getattr(trainer.grads, "gathered", contextlib.nullcontext)
    with gathered():
        state = gather_full_state_dict(trainer.chunks, ctx)
    optimizer_state = sharded_optimizer_state(trainer.optimizer)
    if floor is not None:
        state, optimizer_state = floor.state(state), _unpermuted(optimizer_state, floor)
    layout = getattr(trainer.grads, "layout", None)
    return ZeroRun([r.loss for r in results],
                   {k: v.float().numpy() for k, v in state.items()} if ctx.rank == 0 else None,
                   [ledger], [memory_bytes(trainer.grads, trainer.optimizer)],
                   [{k: v for k, v in trainer.record(results[-1]).items() if k.startswith("mem_")}],
                   [_portable(optimizer_state)],
                   [layout.numel if layout is not None else 0], trainer.num_microbatches)


def _worker(rank: int, world_size: int, layouts: list[list[str]], steps: int) -> list[ZeroRun]:
    return [_run(overrides, world_size, steps, _distributed_context) for overrides in layouts]


def train_zero_layouts(layouts: list[list[str]], world_size: int, steps: int, timeout: float = 300.0,
                       reordered: Optional[str] = None) -> list[ZeroRun]:
    """Train each layout on `world_size` ranks inside one spawn (in this process when world_size=1).

    reordered (one rank only): the noise-floor run of tests/noise_floor.py in that scope, weights
    and optimizer state in the reference's order."""
    if world_size == 1:
        from parallel.topology import ParallelContext

        per_rank = [[_run(o, 1, steps, lambda cfg: ParallelContext.single(), reordered) for o in layouts]]
    else:
        from tests.distributed import run_distributed

        per_rank = run_distributed(_worker, world_size, layouts, steps, timeout=timeout)
    merged = []
    for index in range(len(layouts)):
        runs = [rank_runs[index] for rank_runs in per_rank]
        state = {k: torch.from_numpy(v) for k, v in runs[0].state_dict.items()}
        merged.append(ZeroRun(runs[0].losses, state, [r.ledgers[0] for r in runs], [r.memory[0] for r in runs],
                              [r.metrics[0] for r in runs], [r.optimizer_state[0] for r in runs],
                              [r.padded_numel[0] for r in runs], runs[0].num_microbatches))
    return merged

"""Parity tooling: train a parallel layout for N steps and compare it with the single-rank run.

    losses, state = train_layout(["parallel.tp=2"], world_size=2, steps=10)

Every layout trains the same tiny fp32 model (`PARITY_OVERRIDES` over configs/tiny.yaml) on the
same global batches (`FakeData`: a sample depends only on its global position), so each layout's
per-step loss and final weights must equal the single-rank ones up to fp32 rounding. Several
layouts of one world size run inside one spawn (`train_layouts`), since starting gloo ranks costs
seconds on this machine. Pipeline, context-parallel and ZeRO tests reuse these helpers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from engine.train.synthetic_data import SyntheticData as FakeData  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"

PARITY_OVERRIDES = (
    # Small enough for ten steps on two cores in a few seconds; heads/kv heads/ffn/vocab divisible
    # by 4 so tp=4 works; fp32 so layouts agree to rounding. The weight tolerance is absolute and
    # Adam turns rounding noise in near-zero gradients into O(lr) noise in the update, so keep
    # the learning rate moderate (at 1e-2 TP weights drift ~1.3e-5 from single-rank; at 3e-3 ~4e-6).
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4",
    "model.ffn_hidden_size=128", "model.vocab_size=128", "model.seq_length=32",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=10",
    "optim.warmup_steps=2", "optim.lr=3.0e-3", "precision.dtype=fp32",
)
"""The parity model and batch on top of configs/tiny.yaml."""


@dataclass
class LayoutRun:
    """What one layout's run produced."""

    losses: list[float]
    """Global mean loss of each step (rank 0's view)."""
    state_dict: Optional[dict] = None
    """Full (gathered) parameters after the last step."""
    ledgers: list[dict] = field(default_factory=list)
    """Per rank: {(group, op): bytes} of the last step."""
    calls: list[dict] = field(default_factory=list)
    """Per rank: {(group, op): number of collectives} of the last step."""
    grad_buffer_bytes: list[int] = field(default_factory=list)
    """Per rank: bytes of the DP gradient buffer."""
    num_microbatches: int = 0
    """Microbatches per step on each DP rank."""
    num_buckets: int = 0
    """Buckets of the DP gradient buffer."""
    buckets: list[int] = field(default_factory=list)
    """Per rank: buckets of its DP gradient buffer (pipeline stages hold different parameters)."""


def parity_config(overrides: list[str], world_size: int, steps: int, stage: str = "pretrain"):
    """The validated tiny parity config with `overrides` for `world_size` ranks and `steps` steps,
    with the config sections of `stage` (e.g. 'dpo' for dpo.* keys)."""
    return stage_config(TINY_CONFIG, [*PARITY_OVERRIDES, *overrides, f"train.steps={steps}"], world_size, stage)


def stage_config(path, overrides: list[str], world_size: int, stage: str = "pretrain"):
    """A config as `apogee <stage>` loads and validates it (its sections, its rules) for `world_size` ranks."""
    from engine.config_validation import validate
    from stages.registry import builtin_stages

    registry = builtin_stages()
    chosen = registry.get(stage)
    cfg = validate(registry.load_config(chosen, path, overrides), world_size)
    chosen.validate(cfg, world_size)
    return cfg


def _run_layout(overrides: list[str], world_size: int, steps: int, ctx_factory, masked: bool = False) -> LayoutRun:
    from engine.model.parallelize import gather_full_state_dict
    from engine.train.trainer import Trainer

    cfg = parity_config(overrides, world_size, steps)
    ctx = ctx_factory(cfg)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg, masked))
    losses = [trainer.train_step(step).loss for step in range(steps)]
    ledger = dict(trainer.ledger.bytes), dict(trainer.ledger.calls)
    state = gather_full_state_dict(trainer.chunks, ctx)
    return LayoutRun(losses, state if ctx.rank == 0 else None, [ledger[0]], [ledger[1]], [trainer.grads.num_bytes],
                     trainer.num_microbatches, len(trainer.grads.buckets), [len(trainer.grads.buckets)])


def _distributed_context(cfg):
    from parallel.topology import ParallelContext

    return ParallelContext.create(cfg.parallel)


def _layouts_worker(rank: int, world_size: int, layouts: list[list[str]], steps: int,
                    masked: bool = False) -> list[LayoutRun]:
    runs = [_run_layout(overrides, world_size, steps, _distributed_context, masked) for overrides in layouts]
    for run in runs:
        if run.state_dict is not None:
            # Tensors cross the process boundary by shared-memory handle, which dies with the
            # rank; numpy arrays are pickled by value.
            run.state_dict = {name: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
                              for name, value in run.state_dict.items()}
    return runs


def train_layouts(layouts: list[list[str]], world_size: int, steps: int, timeout: float = 300.0,
                  masked: bool = False) -> list[LayoutRun]:
    """Train each layout (a list of --set overrides) on `world_size` ranks, all inside one spawn.

    Returns one LayoutRun per layout: losses and state dict from rank 0, ledgers from every rank.
    world_size=1 trains in this process (no torch.distributed). masked: SFT-style microbatches
    (tokens, loss mask) with a different number of trained tokens per sample.
    """
    if world_size == 1:
        from parallel.topology import ParallelContext

        return [_run_layout(overrides, 1, steps, lambda cfg: ParallelContext.single(), masked) for overrides in layouts]
    from tests.distributed import run_distributed

    per_rank = run_distributed(_layouts_worker, world_size, layouts, steps, masked, timeout=timeout)
    merged = []
    for index in range(len(layouts)):
        runs = [rank_runs[index] for rank_runs in per_rank]
        state = {name: torch.from_numpy(value) for name, value in runs[0].state_dict.items()}
        merged.append(LayoutRun(runs[0].losses, state, [r.ledgers[0] for r in runs],
                                [r.calls[0] for r in runs], [r.grad_buffer_bytes[0] for r in runs],
                                runs[0].num_microbatches, runs[0].num_buckets, [r.buckets[0] for r in runs]))
    return merged


def train_named_layouts(by_world: dict[int, dict[str, list[str]]], steps: int) -> dict[str, LayoutRun]:
    """{name: run} for named layouts grouped by world size: one spawn per world size."""
    return {name: run for world, layouts in by_world.items()
            for name, run in zip(layouts, train_layouts(list(layouts.values()), world, steps))}


def train_layout(overrides: list[str], world_size: int, steps: int) -> tuple[list[float], dict]:
    """(per-step losses, full state dict) of one layout; see `train_layouts`."""
    run = train_layouts([overrides], world_size, steps)[0]
    return run.losses, run.state_dict


def max_relative_loss_diff(losses: list[float], reference: list[float]) -> float:
    """max over steps of |loss - reference| / |reference|."""
    if len(losses) != len(reference):
        raise AssertionError(f"{len(losses)} losses vs {len(reference)} reference steps")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def max_weight_diff(state: dict, reference: dict) -> float:
    """max over parameters of max |w - w_ref|; the names and shapes must match."""
    if set(state) != set(reference):
        raise AssertionError(f"parameter names differ: {sorted(set(state) ^ set(reference))[:6]}")
    worst = 0.0
    for name, value in state.items():
        if value.shape != reference[name].shape:
            raise AssertionError(f"{name}: shape {tuple(value.shape)} vs {tuple(reference[name].shape)}")
        worst = max(worst, (value.float() - reference[name].float()).abs().max().item())
    return worst


def assert_matches_reference(name: str, run: "LayoutRun", reference: "LayoutRun", tolerance: float = 1e-5) -> None:
    """Per-step loss (relative) and final weights (absolute) within `tolerance` of the reference
    run; prints both differences, so a passing run still shows how close it was."""
    loss_diff = max_relative_loss_diff(run.losses, reference.losses)
    weight_diff = max_weight_diff(run.state_dict, reference.state_dict)
    print(f"{name}: max relative loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff <= tolerance, (name, run.losses, reference.losses)
    assert weight_diff <= tolerance, (name, weight_diff)

"""Parity tooling: train a parallel layout for N steps and compare it with the single-rank run.

    losses, state = train_layout(["parallel.tp=2"], world_size=2, steps=10)

Every layout trains the same tiny fp32 model (`PARITY_OVERRIDES` over configs/tiny.yaml) on the
same global batches (`FakeData`: a sample depends only on its global position), so each layout's
per-step loss and final weights must equal the single-rank ones up to fp32 rounding. Several
layouts of one world size run inside one spawn (`train_layouts`), since starting gloo ranks costs
seconds on this machine. Pipeline, context-parallel and ZeRO tests reuse these helpers.

How close is close enough is measured, not fixed: `SingleRankRuns.tolerance` trains the reference
a second time with its reductions reordered (tests/noise_floor.py) and derives the tolerance from
that noise floor; `assert_matches_reference` prints difference, floor and tolerance.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.train.synthetic_data import SyntheticData as FakeData  # noqa: F401 (tests import it from here)
from tests.noise_floor import Reordered, Tolerance, floor_scope, max_loss_diff, max_weight_diff  # noqa: F401 (re-exported)

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


def _run_layout(overrides: list[str], world_size: int, steps: int, ctx_factory, masked: bool = False,
                reordered: Optional[str] = None, bug: Optional[Callable] = None) -> LayoutRun:
    from engine.model.parallelize import gather_full_state_dict
    from engine.train.trainer import Trainer

    cfg = parity_config(overrides, world_size, steps)
    ctx = ctx_factory(cfg)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg, masked))
    floor = Reordered(trainer, reordered) if reordered else None
    with bug(trainer) if bug is not None else contextlib.nullcontext():
        losses = [trainer.train_step(step, floor.microbatches(step, trainer.microbatches(step)) if floor else None).loss
                  for step in range(steps)]
    ledger = dict(trainer.ledger.bytes), dict(trainer.ledger.calls)
    with getattr(trainer.grads, "gathered", contextlib.nullcontext)():  # ZeRO-3: every unit gathered
        state = gather_full_state_dict(trainer.chunks, ctx)
    if floor is not None:
        state = floor.state(state)
    return LayoutRun(losses, state if ctx.rank == 0 else None, [ledger[0]], [ledger[1]], [trainer.grads.num_bytes],
                     trainer.num_microbatches, len(trainer.grads.buckets), [len(trainer.grads.buckets)])


def _distributed_context(cfg):
    from parallel.topology import ParallelContext

    return ParallelContext.create(cfg.parallel)


def _layouts_worker(rank: int, world_size: int, layouts: list[list[str]], steps: int,
                    masked: bool = False, bugs: Optional[list] = None) -> list[LayoutRun]:
    bugs = bugs or [None] * len(layouts)
    runs = [_run_layout(overrides, world_size, steps, _distributed_context, masked, bug=bug)
            for overrides, bug in zip(layouts, bugs)]
    for run in runs:
        if run.state_dict is not None:
            # Tensors cross the process boundary by shared-memory handle, which dies with the
            # rank; numpy arrays are pickled by value.
            run.state_dict = {name: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
                              for name, value in run.state_dict.items()}
    return runs


def train_layouts(layouts: list[list[str]], world_size: int, steps: int, timeout: float = 300.0,
                  masked: bool = False, bugs: Optional[list] = None) -> list[LayoutRun]:
    """Train each layout (a list of --set overrides) on `world_size` ranks, all inside one spawn.

    Returns one LayoutRun per layout: losses and state dict from rank 0, ledgers from every rank.
    world_size=1 trains in this process (no torch.distributed). masked: SFT-style microbatches
    (tokens, loss mask) with a different number of trained tokens per sample. bugs: per layout,
    None or a deliberate bug (tests/layout_bugs.py) to run that layout with.
    """
    if world_size == 1:
        from parallel.topology import ParallelContext

        return [_run_layout(overrides, 1, steps, lambda cfg: ParallelContext.single(), masked) for overrides in layouts]
    from tests.distributed import run_distributed

    per_rank = run_distributed(_layouts_worker, world_size, layouts, steps, masked, bugs, timeout=timeout)
    merged = []
    for index in range(len(layouts)):
        runs = [rank_runs[index] for rank_runs in per_rank]
        state = {name: torch.from_numpy(value) for name, value in runs[0].state_dict.items()}
        merged.append(LayoutRun(runs[0].losses, state, [r.ledgers[0] for r in runs],
                                [r.calls[0] for r in runs], [r.grad_buffer_bytes[0] for r in runs],
                                runs[0].num_microbatches, runs[0].num_buckets, [r.buckets[0] for r in runs]))
    return merged


def train_named_layouts(by_world: dict[int, dict[str, list[str]]], steps: int,
                        bugs: Optional[dict[str, Callable]] = None) -> dict[str, LayoutRun]:
    """{name: run} for named layouts grouped by world size: one spawn per world size.

    bugs: {layout name: deliberate bug} for layouts that run with one (tests/layout_bugs.py).
    """
    bugs = bugs or {}
    return {name: run for world, layouts in by_world.items()
            for name, run in zip(layouts, train_layouts(list(layouts.values()), world, steps,
                                                        bugs=[bugs.get(name) for name in layouts]))}


def train_layout(overrides: list[str], world_size: int, steps: int) -> tuple[list[float], dict]:
    """(per-step losses, full state dict) of one layout; see `train_layouts`."""
    run = train_layouts([overrides], world_size, steps)[0]
    return run.losses, run.state_dict


def max_relative_loss_diff(losses: list[float], reference: list[float]) -> float:
    """max over steps of |loss - reference| / |reference|."""
    return max_loss_diff(losses, reference, relative=True)


class SingleRankRuns:
    """Single-rank reference runs and their tolerances, each trained once per test session.

    One instance lives in the session fixture `single_rank` (tests/conftest.py): modules whose
    references train the same config (the TP/DP, context-parallel and pipeline parity tests) share
    the run, and each floor (a config and a scope of tests/noise_floor.py) costs one more in-process run.
    """

    def __init__(self):
        self._runs: dict[tuple, LayoutRun] = {}

    def _run(self, overrides, steps: int, masked: bool, reordered: Optional[str]) -> LayoutRun:
        key = (tuple(overrides), steps, masked, reordered)
        if key not in self._runs:
            from parallel.topology import ParallelContext

            self._runs[key] = _run_layout(list(overrides), 1, steps, lambda cfg: ParallelContext.single(), masked,
                                          reordered=reordered)
        return self._runs[key]

    def reference(self, overrides, steps: int, masked: bool = False) -> LayoutRun:
        """The single-rank run of the parity config with `overrides`."""
        return self._run(overrides, steps, masked, reordered=None)

    def reordered(self, overrides, steps: int, masked: bool = False, layout=()) -> LayoutRun:
        """The reference run again with the reductions `layout` reorders reordered (tests/noise_floor.py)."""
        return self._run(overrides, steps, masked, reordered=floor_scope([*overrides, *layout]))

    def tolerance(self, overrides, steps: int, masked: bool = False, layout=()) -> Tolerance:
        """The tolerance of `layout` (its --set overrides) on this config: from the reference and its floor run."""
        reference, reordered = self.reference(overrides, steps, masked), self.reordered(overrides, steps, masked, layout)
        return Tolerance.measured((reference.losses, reference.state_dict), (reordered.losses, reordered.state_dict))


def assert_matches_reference(name: str, run: "LayoutRun", reference: "LayoutRun", tolerance: Tolerance,
                             state: Optional[dict] = None) -> tuple[float, float]:
    """Per-step loss (relative) and final weights (absolute) within `tolerance` of the reference
    run; prints both differences with their floors and tolerances, so a passing run still shows
    how close it was. state: the weights to compare, when not all of run.state_dict."""
    return tolerance.check(name, run.losses, run.state_dict if state is None else state,
                           reference.losses, reference.state_dict)

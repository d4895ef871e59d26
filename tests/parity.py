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


class FakeData:
    """Deterministic stand-in for TrainingData: sample p of the run depends only on (seed, p).

    Global position p = step * GBS + j * (mbs * dp) + r * mbs + i for sample i of microbatch j on
    DP rank r, so every DP layout trains on the same global batch. Each token continues an
    arithmetic progression mod vocab or is one of 8 frequent tokens, so there is something to
    learn and the loss falls within ten steps.
    """

    def __init__(self, seed: int, vocab_size: int, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 masked: bool = False):
        self.seed, self.vocab_size, self.seq_length = seed, vocab_size, seq_length
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.masked = masked

    @classmethod
    def for_config(cls, cfg, masked: bool = False) -> "FakeData":
        """The data of a config's model and batch sizes (masked: SFT-style microbatches)."""
        return cls(cfg.seed, cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size,
                   cfg.train.global_batch_size, masked)

    def loss_mask(self, position: int) -> torch.Tensor:
        """SFT-style mask [seq] of sample `position`: a prompt of 0..seq/2 untrained targets, then trained ones."""
        from parallel.random import generator

        prompt = int(torch.randint(0, self.seq_length // 2 + 1, (1,), generator=generator(self.seed, "mask", position)))
        return (torch.arange(self.seq_length) >= prompt).float()

    def sample(self, position: int) -> torch.Tensor:
        """Tokens [seq + 1] of global sample `position`."""
        from parallel.random import generator

        gen = generator(self.seed, "parity-data", position)
        n = self.seq_length + 1
        start = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
        stride = int(torch.randint(1, 4, (1,), generator=gen))
        progression = (start + stride * torch.arange(n)) % self.vocab_size
        frequent = torch.randint(0, 8, (n,), generator=gen)  # a skewed unigram: learnt in a few steps
        return progression.where(torch.rand(n, generator=gen) < 0.5, frequent)

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> torch.Tensor:
        """LongTensor [mbs, seq + 1]: microbatch `microbatch` of DP rank `dp_rank` at optimizer step `step`."""
        data_step = step
        for skipped in sorted(skip_steps):  # skipped batches are never trained on: shift past them
            if skipped <= data_step:
                data_step += 1
        mbs = self.micro_batch_size
        first = data_step * self.global_batch_size + microbatch * mbs * dp_size + dp_rank * mbs
        tokens = torch.stack([self.sample(first + i) for i in range(mbs)])
        if not self.masked:
            return tokens
        return tokens, torch.stack([self.loss_mask(first + i) for i in range(mbs)])


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


def parity_config(overrides: list[str], world_size: int, steps: int):
    """The validated tiny parity config with `overrides` for `world_size` ranks and `steps` steps."""
    from engine.config import load_config
    from engine.config_validation import validate

    return validate(load_config(TINY_CONFIG, [*PARITY_OVERRIDES, *overrides] + [f"train.steps={steps}"]),
                    world_size)


def _run_layout(overrides: list[str], world_size: int, steps: int, ctx_factory, masked: bool = False) -> LayoutRun:
    from engine.parallelize import gather_full_state_dict
    from engine.trainer import Trainer

    cfg = parity_config(overrides, world_size, steps)
    ctx = ctx_factory(cfg)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg, masked))
    losses = [trainer.train_step(step).loss for step in range(steps)]
    ledger = dict(trainer.ledger.bytes), dict(trainer.ledger.calls)
    state = gather_full_state_dict(trainer.chunks, ctx)
    return LayoutRun(losses, state if ctx.rank == 0 else None, [ledger[0]], [ledger[1]], [trainer.grads.num_bytes],
                     trainer.num_microbatches, len(trainer.grads.buckets), [len(trainer.grads.buckets)])


def _distributed_context(cfg):
    from parallel.topology import ParallelContext, ParallelDims

    p = cfg.parallel
    return ParallelContext.create(ParallelDims(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep))


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

"""Cost of the resilience checks: percent of step time at the default intervals.

    python bench/bench_resilience.py [--quick]

Two trainers with identical models and data run interleaved step by step in one process (so
machine load hits both alike): one bare, one with the step guard at the default settings
(per-step spike judgement and gradient fingerprints, replica fingerprints every
resilience.check_interval steps). The periodic audit recomputes a whole step, so its cost is
1 / audit_interval of the step time by construction; it is measured too, at interval 10, and
scaled. Printed, never asserted.

Measured 2026-11-22 on the 2-core CPU box (quiet), 58M-parameter model, bf16, 2048 tokens/step:
bare 1569 ms/step; guard at defaults +0.16%; audit every 10 steps +8.1% (so every 100: ~+1%).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from engine.config import load_config  # noqa: E402
from engine.config_validation import validate  # noqa: E402
from engine.resilience.guard import StepGuard  # noqa: E402
from engine.train.trainer import Trainer  # noqa: E402
from parallel.topology import ParallelContext  # noqa: E402
from engine.train.synthetic_data import SyntheticData as FakeData  # noqa: E402

MODEL = ["model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=8",
         "model.ffn_hidden_size=1408", "model.vocab_size=32000", "model.seq_length=256",
         "train.micro_batch_size=4", "train.global_batch_size=8", "precision.dtype=bf16"]


def build(overrides: list[str], guarded: bool) -> Trainer:
    cfg = validate(load_config("configs/tiny.yaml", overrides), 1)
    ctx = ParallelContext.single()
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg))
    if guarded:
        trainer.guard = StepGuard(cfg.resilience, trainer, ctx.comm_group("world", trainer.ledger))
    return trainer


def timed_step(trainer: Trainer, step: int) -> float:
    start = time.perf_counter()
    result = trainer.train_step(step)
    if trainer.guard is not None:
        trainer.guard.after_step(step, result.loss, result.grad_norm, trainer.last_local_loss)
    return time.perf_counter() - start


def paired_overheads(times: dict, warm: int) -> dict:
    """{config: (median, 25th, 75th percentile)} of step-by-step ratios to the bare step, in percent:
    each ratio pairs a configuration's step with the bare trainer's same step, run next to it."""
    out = {}
    for name, values in times.items():
        if name == "bare":
            continue
        ratios = sorted(100 * (t / b - 1) for t, b in zip(values[warm:], times["bare"][warm:]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = (statistics.median(ratios), q[0], q[2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = [] if args.quick else MODEL
    steps = 4 if args.quick else args.steps
    common = [*model, f"precision.dtype={args.dtype}", f"train.steps={steps}", "resilience.spike_window=1000"]
    trainers = {"bare": build(common, guarded=False), "guard": build(common, guarded=True),
                "abft": build([*common, "resilience.abft_interval=1"], guarded=True),
                "audit": build([*common, "resilience.audit_interval=10"], guarded=True)}
    times = {name: [] for name in trainers}
    for step in range(steps):  # interleaved, order reversed every other step: drift hits all alike
        order = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in order:
            times[name].append(timed_step(trainers[name], step))
    warm = 2
    bare = trainers["bare"]
    interval = trainers["guard"].cfg.resilience.check_interval
    overheads = paired_overheads(times, warm)
    labels = {"guard": f"guard, defaults (replica check every {interval})",
              "abft": "guard + ABFT checksums every step (abft_interval=1)",
              "audit": "guard + audit every 10 steps"}
    print(f"model: {bare.model.num_parameters():,} parameters, {bare.global_tokens} tokens/step, {args.dtype}, "
          f"{steps - warm} paired steps")
    print(f"{'configuration':<54}{'step ms':>9}{'overhead':>10}{'  25-75% of the paired steps':>30}")
    print(f"{'bare (no checks)':<54}{statistics.median(times['bare'][warm:]) * 1000:>9.1f}")
    for name, label in labels.items():
        median, low, high = overheads[name]
        print(f"{label:<54}{statistics.median(times[name][warm:]) * 1000:>9.1f}{median:>9.2f}%"
              f"{f'{low:+.2f}% .. {high:+.2f}%':>30}")
    guard = overheads["guard"][0]  # an audit recomputes one step: its share scales with 1 / interval
    print(f"{'  -> audit every 100 steps (scaled)':<54}{'':>9}{guard + (overheads['audit'][0] - guard) / 10:>9.2f}%")

if __name__ == "__main__":
    main()

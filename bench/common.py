"""What the benchmarks share: a small validated config and its context (bench/ never imports tests/)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL = ("model.hidden_size=64 model.num_layers=2 model.num_heads=8 model.num_kv_heads=4 model.ffn_hidden_size=128 "
         "model.vocab_size=128 model.seq_length=32 train.micro_batch_size=2 train.global_batch_size=8 "
         "optim.warmup_steps=2 optim.lr=3.0e-3 precision.dtype=fp32").split()
"""A model and batch small enough for a few steps of any layout on two cores (over configs/tiny.yaml)."""


def small_config(overrides: list[str], world_size: int, steps: int):
    """configs/tiny.yaml with SMALL and `overrides`, validated for `world_size` ranks and `steps` steps."""
    from engine.config import load_config
    from engine.config_validation import validate

    return validate(load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *overrides, f"train.steps={steps}"]), world_size)


def context_for(cfg):
    """This rank's ParallelContext for a validated config (torch.distributed already joined)."""
    from parallel.topology import ParallelContext

    return ParallelContext.create(cfg.parallel)

"""Sharded initialisation: peak host memory and time per rank building a ~1B model at tp=1 and tp=2.

    python bench/bench_init.py [--quick] [--dtype fp32|bf16]

Each layout runs on real gloo ranks (parallel/spawn.py). Every rank builds its model the way the
trainer does (engine/train/trainer.py: `meta_model` -> `parallelize_model` -> `materialize`):
on the meta device, then storage for its shard only, each weight drawn tile by tile. The rank
reports its peak resident set (VmHWM of /proc/self/status, i.e. getrusage's maxrss) after
materialising, its resident set before building (torch, gloo: what every process pays anyway),
and the build time. The model: Llama-3-1B-like widths (hidden 2048, ffn 8192, 32 heads / 8 kv
heads, vocab 32000, untied) with 14 layers, 0.98B parameters, in fp32 (3.7 GB at tp=1). --quick
is a half-width 2-layer model (~0.1B) for the smoke test: there the processes' own ~0.2 GB
dominate, so its ratio says little. The last line is the ratio of the largest per-rank
peak at tp=2 to the one at tp=1. Timings are printed side by side, never asserted; the ranks of
tp=2 share this machine's two cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.common import ROOT  # noqa: E402
from parallel.spawn import run_distributed  # noqa: E402

MODEL = ["model.hidden_size=2048", "model.ffn_hidden_size=8192", "model.num_heads=32", "model.num_kv_heads=8",
         "model.vocab_size=32000", "model.tie_embeddings=false", "model.seq_length=128",
         "train.micro_batch_size=1", "train.global_batch_size=2"]
"""0.98B parameters at 14 layers (Llama 3.2 1B's widths with a 32000 vocabulary)."""

QUICK = ["model.hidden_size=1024", "model.ffn_hidden_size=4096", "model.num_heads=16"]
"""The smoke test's half-width model (with 2 layers)."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _build(rank: int, world_size: int, layers: int, dtype: str, overrides: list) -> dict:
    """One rank: build and materialise its shard; its memory and time."""
    from engine.config import load_config
    from engine.config_validation import validate
    from engine.model.decoder import count_parameters
    from engine.model.meta_init import materialize, meta_model
    from engine.model.parallelize import parallelize_model
    from parallel.collectives import CommLedger
    from parallel.topology import ParallelContext

    cfg = validate(load_config(ROOT / "configs" / "tiny.yaml",
                               [*MODEL, *overrides, f"model.num_layers={layers}", f"parallel.tp={world_size}",
                                f"precision.dtype={dtype}"]), world_size)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    model = parallelize_model(meta_model(cfg.model), cfg, ctx, CommLedger())
    model = materialize(model, cfg.seed, ctx.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    seconds = time.perf_counter() - start
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rank": rank, "before_kib": before, "peak_kib": _status_kib("VmHWM"), "seconds": seconds,
            "local_bytes": local, "params": count_parameters(cfg.model)}


def _worker(rank: int, world_size: int, layers: int, dtype: str, overrides: list) -> dict:
    return _build(rank, world_size, layers, dtype, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a half-width 2-layer model (~0.1B) instead of ~1B")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    layers, overrides = (2, QUICK) if args.quick else (14, [])
    peaks = {}
    print(f"{'layout':<8}{'rank':>5}{'params':>10}{'shard GB':>10}{'RSS before GB':>15}{'peak RSS GB':>13}"
          f"{'init s':>8}")
    for tp in (1, 2):
        # Ranks are fresh processes: no rank's peak includes another layout's build.
        results = run_distributed(_worker, tp, layers, args.dtype, overrides, timeout=900)
        for r in results:
            print(f"{'tp' + str(tp):<8}{r['rank']:>5}{r['params'] / 1e9:>9.2f}B{r['local_bytes'] / 2**30:>10.2f}"
                  f"{r['before_kib'] / 2**20:>15.2f}{r['peak_kib'] / 2**20:>13.2f}{r['seconds']:>8.1f}")
        peaks[tp] = max(r["peak_kib"] for r in results)
    print(f"largest per-rank peak: tp1 {peaks[1] / 2**20:.2f} GB, tp2 {peaks[2] / 2**20:.2f} GB ({args.dtype})")
    print(f"init peak host memory: tp2/tp1 = {peaks[2] / peaks[1]:.2f}")


if __name__ == "__main__":
    main()

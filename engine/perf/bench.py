"""`apogee bench`: measure a config's training throughput and MFU on this machine or allocation.

It runs the config for `--warmup` + `--steps` steps in a fresh run directory (no checkpoints,
no resume) through the same launcher as `apogee pretrain` (so `--nproc`, torchrun and srun work
the same), then summarises the measured steps from metrics.jsonl: median step time, tokens/s,
MFU (model FLOPs by Megatron's counter over the peak the run measured or looked up; see
engine/train/metrics.py) and per-rank memory of parameters, gradients and optimizer state. Warm-up
steps (allocator, compilation, the first collectives) are left out of the summary.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Optional

from engine.config import ConfigError

SUMMARY_KEYS = ("step_time_s", "tokens_per_s", "mfu", "throughput_tflops_per_gpu", "mem_params_bytes",
                "mem_grads_bytes", "mem_optim_bytes")
"""Keys of the summary (per rank for memory; median over the measured steps for the rest)."""


def summarise(records: list[dict], warmup: int) -> dict:
    """The summary of a run's metrics.jsonl records, leaving out the first `warmup` steps."""
    measured = [r for r in records if r["step"] > warmup]
    if not measured:
        raise ValueError(f"no step after the {warmup} warm-up steps to measure")
    median = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
    last = measured[-1]
    return {"steps": len(measured), "step_time_s": median("iteration_time"), "tokens_per_s": median("tokens_per_s"),
            "mfu": median("mfu"), "throughput_tflops_per_gpu": median("throughput"),
            "mem_params_bytes": last["mem_params_bytes"], "mem_grads_bytes": last["mem_grads_bytes"],
            "mem_optim_bytes": last["mem_optim_bytes"]}


def format_summary(summary: dict) -> str:
    """A few human-readable lines."""
    gib = 2.0 ** 30
    return (f"apogee bench: {summary['steps']} measured steps\n"
            f"  step time  {summary['step_time_s'] * 1000:,.1f} ms (median)\n"
            f"  tokens/s   {summary['tokens_per_s']:,.0f}\n"
            f"  MFU        {100 * summary['mfu']:.1f}%  ({summary['throughput_tflops_per_gpu']:.3f} TFLOP/s per rank)\n"
            f"  memory     params {summary['mem_params_bytes'] / gib:.3f} GiB, grads {summary['mem_grads_bytes'] / gib:.3f} "
            f"GiB, optimizer {summary['mem_optim_bytes'] / gib:.3f} GiB per rank")


def run_bench(cfg, stage, run_dir: Optional[str], nproc: Optional[int], steps: int, warmup: int) -> tuple[int, Optional[dict]]:
    """Train `cfg` (as `stage`) for warmup + steps steps in a fresh run directory, no checkpoints;
    returns (exit status, the summary on the reporting rank, else None)."""
    from engine.job.launch import detect_launcher
    from engine.job.runner import run_job

    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} --warmup {warmup}: need steps >= 1 and warmup >= 0")
    cfg.train.steps, cfg.checkpoint.interval, cfg.logging.tensorboard = warmup + steps, 0, False
    out = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=f"apogee-bench-{cfg.name}-"))
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"--run-dir {out}: already holds a run; a benchmark starts from nothing")
    status = run_job(cfg, stage, run_dir=str(out), nproc=nproc, resume="never")
    if status != 0 or detect_launcher().rank != 0:  # under torchrun/srun: rank 0 reports
        return status, None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return 0, summarise(records, warmup)

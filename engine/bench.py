"""`apogee bench`: measure a config's training throughput and MFU on this machine or allocation.

It runs the config for `--warmup` + `--steps` steps in a fresh run directory (no checkpoints,
no resume) through the same launcher as `apogee pretrain` (so `--nproc`, torchrun and srun work
the same), then summarises the measured steps from metrics.jsonl: median step time, tokens/s,
MFU (model FLOPs by Megatron's counter over the peak the run measured or looked up; see
engine/metrics.py) and per-rank memory of parameters, gradients and optimizer state. Warm-up
steps (allocator, compilation, the first collectives) are left out of the summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from engine.config import ConfigError, load_config

SUMMARY_KEYS = ("step_time_s", "tokens_per_s", "mfu", "throughput_tflops_per_gpu", "mem_params_bytes",
                "mem_grads_bytes", "mem_optim_bytes")
"""Keys of the summary (per rank for memory; median over the measured steps for the rest)."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee bench` (the run options of `apogee pretrain`, plus the step counts)."""
    from engine.cli import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and left out (default 3)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


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


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark job and print its summary; bad input exits 2."""
    from engine.launch import detect_launcher
    from engine.runner import exit_on_config_error, run_job

    def run() -> int:
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError(f"--steps {args.steps} --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
        overrides = [*args.overrides, f"train.steps={args.warmup + args.steps}", "checkpoint.interval=0",
                     "logging.tensorboard=false"]
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix=f"apogee-bench-{cfg.name}-"))
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"--run-dir {run_dir}: already holds a run; a benchmark starts from nothing")
        status = run_job(cfg, run_dir=str(run_dir), nproc=args.nproc, resume="never")
        if status != 0 or detect_launcher().rank != 0:  # under torchrun/srun: rank 0 reports
            return status
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = summarise(records, args.warmup)
        print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
        return 0

    return exit_on_config_error(run)


"""`apogee bench`: train a config briefly and report median step time, tokens/s, MFU and memory
(engine/perf/bench.py)."""
from __future__ import annotations

import argparse
import json

from cli.run import add_run_arguments, flatten


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee bench` (the run options of `apogee pretrain`, plus the step counts)."""
    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and left out (default 3)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_cli(args: argparse.Namespace, registry) -> int:
    """Run the benchmark job (a pre-training run) and print its summary; bad input exits 2."""
    from engine.job.runner import exit_on_config_error
    from engine.perf.bench import format_summary, run_bench

    def run() -> int:
        stage = registry.get("pretrain")
        cfg = registry.load_config(stage, args.config, flatten(args.overrides))
        status, summary = run_bench(cfg, stage, args.run_dir, args.nproc, args.steps, args.warmup)
        if summary is not None:
            print(json.dumps(summary) if args.json else format_summary(summary), flush=True)
        return status

    return exit_on_config_error(run)

"""The `apogee` command: one entry point, one subcommand per job kind.

Every subcommand checks its input before any process starts; a bad value exits with status 2 and
a message naming the option or config key, the value and what would be valid.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from cli import bench, eval as evaluate, export, generate, plan, preprocess, submit, topology
from cli.run import add_stage_commands, run_stage_command


def build_parser(registry) -> argparse.ArgumentParser:
    """The argument parser of `apogee` with all subcommands (one per stage of `registry`)."""
    parser = argparse.ArgumentParser(prog="apogee", description="4D-parallel LLM pretraining engine")
    sub = parser.add_subparsers(dest="command", required=True)
    preprocess.add_cli_arguments(sub.add_parser("preprocess", help="text/jsonl -> Megatron .bin/.idx"))
    topology.add_cli_arguments(sub.add_parser("topology", help="print each rank's coordinates and process groups"))
    add_stage_commands(sub, registry)
    bench.add_cli_arguments(sub.add_parser(
        "bench", help="train a config for a few steps and report step time, tokens/s, MFU and memory"))
    submit.add_cli_arguments(sub.add_parser(
        "submit", help="validate a run for a Slurm allocation and sbatch it (requeues and resumes)"), registry.names())
    export.add_cli_arguments(sub.add_parser(
        "export", help="write a checkpoint in another format (Hugging Face Llama)"))
    generate.add_cli_arguments(sub.add_parser(
        "generate", help="sample completions from a checkpoint (KV cache; greedy, temperature, top-p; TP ranks)"))
    evaluate.add_cli_arguments(sub.add_parser(
        "eval", help="checkpoints side by side: loss/ppl/bits per byte on held-out data, task accuracy and pass@k"))
    plan.add_cli_arguments(sub.add_parser("plan", help="rank parallel layouts for a GPU cluster by predicted step time"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `apogee` console script."""
    from stages.registry import builtin_stages

    registry = builtin_stages()
    args = build_parser(registry).parse_args(argv)
    commands = {"preprocess": preprocess.run_cli, "topology": topology.run_cli, "export": export.run_cli,
                "plan": plan.run_cli, "generate": generate.run_cli, "eval": evaluate.run_cli}
    if args.command in commands:
        return commands[args.command](args) or 0
    if args.command == "bench":
        return bench.run_cli(args, registry)
    if args.command == "submit":
        return submit.run_cli(args, registry)
    return run_stage_command(args, registry)


if __name__ == "__main__":
    sys.exit(main())

"""The `apogee` command: one entry point, one subcommand per job kind.

Every subcommand checks its input before any process starts; a bad value exits with status 2 and
a message naming the option or config key, the value and what would be valid.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every training stage (pretrain, midtrain, sft, dpo, grpo)."""
    parser.add_argument("--config", help="YAML config file (default: the tiny CPU config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys, e.g. --set parallel.tp=2 train.steps=50")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to start (default: the launcher's world size, else 1)")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>)")
    parser.add_argument("--resume", default="auto", help="auto (latest checkpoint if any), never, or a checkpoint path")


def _flatten(overrides: list) -> list[str]:
    return [item for group in overrides for item in (group if isinstance(group, list) else [group])]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `apogee` with all subcommands."""
    parser = argparse.ArgumentParser(prog="apogee", description="4D-parallel LLM pretraining engine")
    sub = parser.add_subparsers(dest="command", required=True)

    from data_pipeline import preprocess
    p = sub.add_parser("preprocess", help="text/jsonl -> Megatron .bin/.idx")
    preprocess.add_cli_arguments(p)

    from parallel import topology
    p = sub.add_parser("topology", help="print each rank's coordinates and process groups")
    topology.add_cli_arguments(p)

    p = sub.add_parser("pretrain", help="pre-train a model")
    add_run_arguments(p)

    p = sub.add_parser("midtrain", help="branch a pre-training run: WSD cooldown (midtrain.branch_from), long context, "
                                       "new data mix (train.init_from)")
    add_run_arguments(p)

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response examples (sft.* keys)")
    add_run_arguments(p)

    p = sub.add_parser("dpo", help="direct preference optimisation on {prompt, chosen, rejected} pairs (dpo.* keys)")
    add_run_arguments(p)

    p = sub.add_parser("grpo", help="GRPO with verifiable rewards on {prompt, answer} prompts (grpo.* keys)")
    add_run_arguments(p)

    from engine import bench
    p = sub.add_parser("bench", help="train a config for a few steps and report step time, tokens/s, MFU and memory")
    bench.add_cli_arguments(p)

    from engine import submit
    p = sub.add_parser("submit", help="validate a run for a Slurm allocation and sbatch it (requeues and resumes)")
    submit.add_cli_arguments(p)

    from engine import export
    p = sub.add_parser("export", help="write a checkpoint in another format (Hugging Face Llama)")
    export.add_cli_arguments(p)

    from engine import plan
    p = sub.add_parser("plan", help="rank parallel layouts for a GPU cluster by predicted step time")
    plan.add_cli_arguments(p)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `apogee` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "preprocess":
        from data_pipeline import preprocess
        return preprocess.run_cli(args) or 0
    if args.command == "topology":
        from parallel import topology
        return topology.run_cli(args) or 0
    if args.command == "export":
        from engine import export
        return export.run_cli(args)
    if args.command == "bench":
        from engine import bench
        args.overrides = _flatten(args.overrides)
        return bench.run_cli(args)
    if args.command == "submit":
        from engine import submit
        return submit.run_cli(args)
    if args.command == "plan":
        from engine import plan
        args.overrides = _flatten(args.overrides)
        return plan.run_cli(args)
    if args.command in ("pretrain", "midtrain", "sft", "dpo", "grpo"):
        from stages import dpo, grpo, midtrain, pretrain, sft
        args.overrides = _flatten(args.overrides)
        stage = {"pretrain": pretrain, "midtrain": midtrain, "sft": sft, "dpo": dpo, "grpo": grpo}[args.command]
        return stage.run_cli(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

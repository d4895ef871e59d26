"""The training commands: `apogee pretrain|midtrain|sft|dpo|grpo` and `apogee run STAGE` (any stage,
built in or 'package.module:Stage' outside the package), with the options they share."""
from __future__ import annotations

import argparse
import sys


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every training stage (and `apogee bench`)."""
    parser.add_argument("--config", help="YAML config file (default: the stage's preset: configs/tiny.yaml, or configs/sft.yaml, dpo.yaml, grpo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys, e.g. --set parallel.tp=2 train.steps=50")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to start (default: the launcher's world size, else 1)")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest intact checkpoint if any), never (start fresh: refused where checkpoints "
                             "exist, see --overwrite), or a checkpoint: a step_* directory or a run's checkpoints/ "
                             "folder (its newest intact one)")


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """--overwrite: start over in a run directory that holds a run (training commands only)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run directory that already holds a run: the old one is moved aside "
                             "to RUN_DIR.old-<time> (kept, never deleted) and the run starts fresh")


def flatten(overrides: list) -> list[str]:
    """`--set a=1 b=2 --set c=3` -> ['a=1', 'b=2', 'c=3']."""
    return [item for group in overrides for item in (group if isinstance(group, list) else [group])]


def add_stage_commands(sub, registry) -> None:
    """One subcommand per registered stage, and `run` for a stage named on the command line."""
    for name in registry.names():
        p = sub.add_parser(name, help=registry.get(name).help)
        add_run_arguments(p)
        add_overwrite_argument(p)
    p = sub.add_parser("run", help="run any stage: a built-in name or 'package.module:Stage' (an external stage)")
    p.add_argument("stage", metavar="STAGE", help=f"{', '.join(registry.names())}, or package.module:Stage")
    add_run_arguments(p)
    add_overwrite_argument(p)


def run_stage_command(args: argparse.Namespace, registry) -> int:
    """Run the stage the command names; an unknown or broken external stage exits 2 with the reason."""
    from engine.config import ConfigError
    from engine.job.runner import exit_on_config_error, run_stage

    def stage():
        return registry.get(args.stage if args.command == "run" else args.command)

    try:
        chosen = stage()
    except ConfigError:
        return exit_on_config_error(stage)
    if args.overwrite and args.resume not in ("auto", "never"):
        print(f"apogee: error: --overwrite starts the run over; it cannot be combined with --resume {args.resume}",
              file=sys.stderr)
        return 2
    return run_stage(chosen, registry, args.config, flatten(args.overrides), run_dir=args.run_dir,
                     nproc=args.nproc, resume=args.resume, overwrite=args.overwrite)

"""`apogee submit`: validate a run for a Slurm allocation, then sbatch slurm/apogee.sbatch (slurm/submit.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.run import flatten


def add_cli_arguments(parser: argparse.ArgumentParser, stages: list[str]) -> None:
    """Options of `apogee submit`."""
    parser.add_argument("--stage", default="pretrain",
                        help=f"what the job runs: {', '.join(stages)} or package.module:Stage (default pretrain)")
    parser.add_argument("--config", help="YAML config file (default: the tiny CPU config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>); every requeue resumes from it")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--ntasks-per-node", type=int, default=1, help="ranks per node, e.g. GPUs per node")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus-per-node", type=int, default=None,
                         help="GPUs to request per node (at least --ntasks-per-node); a job names GPUs or --cpu")
    devices.add_argument("--cpu", action="store_true", help="a CPU-only job (gloo): no GPUs requested")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPUs per rank, each rank bound to its own (default: the node's CPUs shared out)")
    parser.add_argument("--time", default=None,
                        help="time limit, e.g. 04:00:00 (a checkpoint is written --signal-lead seconds before)")
    parser.add_argument("--signal-lead", type=int, default=90, metavar="S",
                        help="seconds before the time limit at which the ranks are told to checkpoint and stop "
                             "(SIGUSR1; default 90): above one step plus one checkpoint write, 60 or more")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--overcommit", action="store_true", help="allow more ranks than CPUs (CPU test machines)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")


def run_cli(args: argparse.Namespace, registry) -> int:
    """Validate, then submit (or print with --dry-run); the job id goes to stdout. Bad input exits 2."""
    from engine.job.runner import exit_on_config_error, resolve_run_dir
    from slurm.submit import Submission, check, quoted, sbatch, sbatch_command

    submission = Submission(stage=args.stage, config=args.config, overrides=flatten(args.overrides),
                            run_dir=args.run_dir, nodes=args.nodes, ntasks_per_node=args.ntasks_per_node,
                            gpus_per_node=args.gpus_per_node, cpu=args.cpu, cpus_per_task=args.cpus_per_task,
                            time=args.time, partition=args.partition,
                            overcommit=args.overcommit, signal_lead=args.signal_lead)
    checked: list = []
    status = exit_on_config_error(lambda: checked.append(check(submission, registry)) or 0)
    if status:
        return status
    cfg = checked[0]
    run_dir = resolve_run_dir(cfg, args.run_dir).resolve()
    command = sbatch_command(submission, run_dir, f"apogee-{cfg.name}")
    if args.dry_run:
        print(quoted(command))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    code, out = sbatch(command)
    if code != 0:
        print(f"apogee: error: sbatch failed: {out}", file=sys.stderr)
        return 1
    print(f"apogee: submitted job {out} ({args.stage}, {args.nodes} node(s) x {args.ntasks_per_node} task(s)); "
          f"log {run_dir}/slurm-{out}.out")
    print(out)
    return 0

"""`apogee submit`: check a run against its Slurm allocation, then sbatch slurm/apogee.sbatch.

The config is loaded and validated for world = nodes x tasks per node before anything is queued,
so a bad layout is refused at the prompt, not after hours in the queue. The job runs the stage
(`pretrain`, `midtrain`, `sft`, `dpo`, `grpo`) through slurm/apogee.sbatch with one task per rank; the script
requeues on failures a restart can fix and on the pre-timeout signal (a checkpoint is written
first), and every run of the job resumes from the run directory's latest checkpoint. The Slurm
log goes to <run dir>/slurm-<job id>.out.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from engine.config import ConfigError, load_config
from engine.config_validation import validate

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "midtrain", "sft", "dpo", "grpo")
"""Stages a job can run (the `apogee` subcommand the batch script starts)."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee submit`."""
    parser.add_argument("--stage", default="pretrain", choices=STAGES, help="what the job runs (default pretrain)")
    parser.add_argument("--config", help="YAML config file (default: the tiny CPU config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>); every requeue resumes from it")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--ntasks-per-node", type=int, default=1, help="ranks per node, e.g. GPUs per node")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs to request per node")
    parser.add_argument("--time", default=None, help="time limit, e.g. 04:00:00 (a checkpoint is written 90 s before)")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--overcommit", action="store_true", help="allow more ranks than CPUs (CPU test machines)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")


def sbatch_command(args: argparse.Namespace, overrides: list[str], run_dir: Path, job_name: str) -> list[str]:
    """The sbatch command line for `args` (validated already)."""
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={args.nodes}",
               f"--ntasks-per-node={args.ntasks_per_node}", f"--ntasks={args.nodes * args.ntasks_per_node}",
               f"--output={run_dir}/slurm-%j.out",
               f"--export=ALL,APOGEE_STAGE={args.stage},APOGEE_PYTHON={sys.executable}"]
    if args.gpus_per_node:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.time:
        command.append(f"--time={args.time}")
    if args.partition:
        command.append(f"--partition={args.partition}")
    if args.overcommit:
        command.append("--overcommit")
    command += [str(ROOT / "slurm" / "apogee.sbatch"), "--run-dir", str(run_dir)]
    if args.config:
        command += ["--config", str(Path(args.config).resolve())]
    if overrides:
        command += ["--set", *overrides]
    return command


def run_cli(args: argparse.Namespace) -> int:
    """Validate, then submit (or print with --dry-run); the job id goes to stdout. Bad input exits 2."""
    overrides = [item for group in args.overrides for item in group]
    try:
        for name in ("nodes", "ntasks_per_node"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
        cfg = validate(load_config(args.config, overrides), args.nodes * args.ntasks_per_node)
    except ConfigError as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path("runs") / cfg.name).resolve()
    command = sbatch_command(args, overrides, run_dir, f"apogee-{cfg.name}")
    if args.dry_run:
        print(shlex.join(command))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        print(f"apogee: error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    job = done.stdout.strip().split(";")[0]
    print(f"apogee: submitted job {job} ({args.stage}, {args.nodes} node(s) x {args.ntasks_per_node} task(s)); "
          f"log {run_dir}/slurm-{job}.out")
    print(job)
    return 0

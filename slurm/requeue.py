"""The requeue decision of slurm/apogee.sbatch, from every rank's recorded exit status.

srun reports the highest status of its tasks (a signal as 128 + n). When one rank exits 2 (bad
input) and srun then stops the others, the job sees 143; a fault diagnosed on one rank (17) can
surface the same way. Requeueing on that number would restart, up to APOGEE_MAX_REQUEUES times,
a run that fails the same way every time. So the batch script asks this module: each rank left
RUN_DIR/exit/rank-N.json on its way out (engine/resilience/exit_records.py), and a record of this
attempt whose status a restart cannot fix (exit_codes.restart_helps) decides, whatever srun says.

    python -m slurm.requeue run-dir -- APOGEE_ARGS...     the run directory the ranks will use
    python -m slurm.requeue decide --srun-status S [--stop-requested] [--run-dir DIR]
        prints "ACTION STATUS": exit (stop with STATUS), requeue (always: a stop on request),
        retry (requeue while restarts are left); the reason goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from engine.resilience.exit_codes import CONFIG_ERROR, OK, PREEMPTED, describe, restart_helps
from engine.resilience.exit_records import attempt_of, read_exits
from engine.resilience.faulty_nodes import FILE as FAULTY_NODES, excluded_nodes


@dataclass
class Decision:
    """What the batch script does after srun: 'exit', 'requeue' (always) or 'retry' (while restarts are left)."""

    action: str
    status: int
    reason: str


def decide(srun_status: int, records: list[dict], stop_requested: bool = False,
           world_size: Optional[int] = None) -> Decision:
    """The decision for srun's status and this attempt's exit records (see the module doc)."""
    final = [r for r in records if r["status"] != OK and not restart_helps(r["status"])]
    if final:
        first = min(final, key=lambda r: r.get("time", 0.0))
        return Decision("exit", first["status"], f"rank {first['rank']} exited with status {first['status']} "
                        f"({first.get('reason') or describe(first['status'])}), srun reported {srun_status}: "
                        f"a restart would fail the same way; not requeueing")
    if srun_status == OK or (world_size and len(records) == world_size and all(r["status"] == OK for r in records)):
        return Decision("exit", OK, "every rank finished")
    if stop_requested or any(r["status"] == PREEMPTED for r in records):
        return Decision("requeue", PREEMPTED, "stopped at a checkpoint on request")
    if not restart_helps(srun_status):
        return Decision("exit", srun_status, f"srun exited with status {srun_status} ({describe(srun_status)}); "
                        "not requeueing")
    ranks = ", ".join(f"rank {r['rank']}: {r['status']}" for r in records) or "no rank recorded its exit"
    return Decision("retry", srun_status, f"srun exited with status {srun_status} ({describe(srun_status)}; {ranks})")


def run_dir_of(stage_name: str, apogee_args: list[str]) -> Path:
    """The run directory `apogee run STAGE APOGEE_ARGS` uses: --run-dir, else runs/<name> of its config."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-dir")
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+")
    args, _ = parser.parse_known_args(apogee_args)
    if args.run_dir:
        return Path(args.run_dir)
    from engine.job.runner import resolve_run_dir
    from stages.registry import builtin_stages

    registry = builtin_stages()
    stage = registry.get(stage_name)
    overrides = [item for group in args.overrides for item in group]
    return resolve_run_dir(registry.load_config(stage, args.config, overrides), None)


def main(argv: Optional[list[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """The batch script's entry point (see the module doc); a config that does not load exits 2."""
    from engine.config import ConfigError

    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m slurm.requeue")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run-dir").add_argument("apogee_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("decide")
    p.add_argument("--srun-status", type=int, required=True)
    p.add_argument("--stop-requested", action="store_true")
    p.add_argument("--run-dir")
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        rest = args.apogee_args[1:] if args.apogee_args[:1] == ["--"] else args.apogee_args
        try:
            print(run_dir_of(env.get("APOGEE_STAGE", "pretrain"), rest))
        except (ConfigError, ValueError) as error:  # the ranks will say so themselves, with status 2
            print(f"apogee.sbatch: the run's config does not load ({error})", file=sys.stderr)
            return CONFIG_ERROR
        return 0
    records = read_exits(args.run_dir, attempt_of(env)) if args.run_dir else []
    world = int(env["SLURM_NTASKS"]) if env.get("SLURM_NTASKS", "").isdigit() else None
    decision = decide(args.srun_status, records, args.stop_requested, world)
    print(f"apogee.sbatch: {decision.reason}", file=sys.stderr)
    excluded = excluded_nodes(args.run_dir) if args.run_dir else []
    if excluded:  # a requeue keeps the job's node list; a resubmission of the run excludes them
        print(f"apogee.sbatch: node(s) {','.join(excluded)} confirmed faulty ({args.run_dir}/{FAULTY_NODES}): "
              f"`apogee submit --run-dir {args.run_dir}` resubmits with --exclude={','.join(excluded)}", file=sys.stderr)
    print(decision.action, decision.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())

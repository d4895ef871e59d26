"""`apogee submit`: check a run against its Slurm allocation, then sbatch slurm/apogee.sbatch.

The config is loaded and validated for world = nodes x tasks per node before anything is queued,
so a bad layout is refused at the prompt, not after hours in the queue; so is a job that names no
devices (`--gpus-per-node G`, or `--cpu` for a CPU-only job). The job runs the stage
(`pretrain`, `midtrain`, `sft`, `dpo`, `grpo`) through slurm/apogee.sbatch with one task per rank; the script
requeues on failures a restart can fix and on the pre-timeout signal (a checkpoint is written
first), and every run of the job resumes from the run directory's latest checkpoint. The Slurm
log goes to <run dir>/slurm-<job id>.out. Nodes the run directory records as persistently faulty
(RUN_DIR/faulty_nodes.jsonl) are passed as --exclude.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.config import ApogeeConfig
from engine.config_validation import validate
from engine.resilience.faulty_nodes import excluded_nodes

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Submission:
    """What `apogee submit` was asked for: the stage and config to run, and the allocation."""

    stage: str = "pretrain"
    """A registered stage name or 'package.module:Stage' (the batch script runs `apogee run STAGE`)."""
    config: Optional[str] = None
    overrides: list = field(default_factory=list)
    run_dir: Optional[str] = None
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: Optional[int] = None
    cpu: bool = False
    """A CPU-only job, said explicitly: a submission names either GPUs or this."""
    cpus_per_task: Optional[int] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    overcommit: bool = False
    signal_lead: int = 90
    """Seconds before the time limit at which Slurm sends SIGUSR1 (the ranks checkpoint and stop):
    long enough for a step and a checkpoint write; Slurm checks limits only every ~30 s."""

    @property
    def world_size(self) -> int:
        """Ranks of the job: one task per rank."""
        return self.nodes * self.ntasks_per_node


def check(submission: Submission, registry) -> ApogeeConfig:
    """The run's config, validated for the allocation as `apogee <stage>` would (ConfigError otherwise)."""
    from engine.config import ConfigError

    for name in ("nodes", "ntasks_per_node", "cpus_per_task", "signal_lead"):
        value = getattr(submission, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    stage = registry.get(submission.stage)
    cfg = registry.load_config(stage, submission.config, submission.overrides)
    registry.check_foreign(stage, cfg)
    stage.prepare(cfg, submission.run_dir, "auto")
    validate(cfg, submission.world_size)
    stage.validate(cfg, submission.world_size)
    check_devices(submission)
    return cfg


def check_devices(submission: Submission) -> None:
    """A job names its devices: --gpus-per-node G (one GPU per rank at least), or --cpu (ConfigError otherwise).

    Every submission must say which: a GPU job whose --gpus-per-node was left out would be given
    no GPUs and train on CPU without a word, at a fraction of the speed, until its time limit.
    """
    from engine.config import ConfigError

    s = submission
    if s.cpu and s.gpus_per_node is not None:
        raise ConfigError(f"--cpu with --gpus-per-node={s.gpus_per_node}: a job runs on GPUs or on CPUs; give one")
    if s.cpu:
        return
    if s.gpus_per_node is None:
        raise ConfigError("--gpus-per-node is missing: a job without GPUs trains on CPU with gloo; give "
                          f"--gpus-per-node G (G >= --ntasks-per-node={s.ntasks_per_node}, one GPU per rank), or "
                          "--cpu for a CPU-only job")
    if s.gpus_per_node < s.ntasks_per_node:
        raise ConfigError(f"--gpus-per-node={s.gpus_per_node}: fewer GPUs than ranks per node "
                          f"(--ntasks-per-node={s.ntasks_per_node}); each rank needs a GPU of its own (NCCL)")


def sbatch_command(submission: Submission, run_dir: Path, job_name: str) -> list[str]:
    """The sbatch command line of a checked submission."""
    s = submission
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={s.nodes}",
               f"--ntasks-per-node={s.ntasks_per_node}", f"--ntasks={s.world_size}",
               f"--output={run_dir}/slurm-%j.out", f"--signal=B:USR1@{s.signal_lead}",
               f"--export=ALL,APOGEE_STAGE={s.stage},APOGEE_PYTHON={sys.executable}"]
    if s.gpus_per_node:
        command.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        command.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.time:
        command.append(f"--time={s.time}")
    if s.partition:
        command.append(f"--partition={s.partition}")
    if s.overcommit:
        command.append("--overcommit")
    excluded = excluded_nodes(run_dir)
    if excluded:  # nodes this run confirmed faulty (engine/resilience/faulty_nodes.py)
        command.append(f"--exclude={','.join(excluded)}")
    command += [str(ROOT / "slurm" / "apogee.sbatch"), "--run-dir", str(run_dir)]
    if s.config:
        command += ["--config", str(Path(s.config).resolve())]
    if s.overrides:
        command += ["--set", *s.overrides]
    return command


def sbatch(command: list[str]) -> tuple[int, str]:
    """Run sbatch; (0, job id) or (1, sbatch's error)."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return 1, done.stderr.strip()
    return 0, done.stdout.strip().split(";")[0]


def quoted(command: list[str]) -> str:
    """The command as a shell line (what --dry-run prints)."""
    return shlex.join(command)

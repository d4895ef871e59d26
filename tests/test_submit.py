"""`apogee submit` and the stop-on-signal path: validation at the prompt, the sbatch command, and a
real job on the local Slurm cluster that is told to stop (the pre-timeout signal), checkpoints,
requeues and finishes from where it stopped."""
import json
import subprocess
import sys
import time

import pytest

from data_pipeline.words_corpus import make_dataset
from tests.test_launch import ROOT, launcher_env, slurm_is_up, wait_for_job

TRAIN = ["model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
         "checkpoint.interval=10", "logging.tensorboard=false"]


def _submit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cli.main", "submit", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or launcher_env(), timeout=60)


def test_dry_run_prints_the_sbatch_command_for_the_stage(tmp_path):
    done = _submit("--stage", "sft", "--nodes", "2", "--ntasks-per-node", "4", "--gpus-per-node", "4", "--time",
                   "01:00:00", "--cpus-per-task", "12", "--run-dir", str(tmp_path / "run"), "--dry-run", "--set", "parallel.tp=2",
                   "sft.inputs=[x.jsonl]")
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip()
    for part in ("sbatch --parsable", "--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--gpus-per-node=4",
                 "--cpus-per-task=12",
                 "--time=01:00:00", "APOGEE_STAGE=sft", f"--output={tmp_path}/run/slurm-%j.out",
                 "slurm/apogee.sbatch --run-dir", "--set parallel.tp=2 'sft.inputs=[x.jsonl]'"):
        assert part in command, part


@pytest.mark.parametrize("args, message", [
    (["--ntasks-per-node", "3", "--set", "parallel.tp=2"], "must divide the world size 3"),
    (["--nodes", "0"], "--nodes=0: must be >= 1"),
    (["--set", "parallel.zero=7"], "parallel.zero=7: expected one of 0, 1, 2, 3"),
])
def test_a_layout_that_cannot_run_is_refused_before_queueing(args, message):
    done = _submit(*args, "--dry-run")
    assert done.returncode == 2 and message in done.stderr and "sbatch" not in done.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--gpus-per-node is missing: a job without GPUs trains on CPU with gloo; give --gpus-per-node G"),
    (["--ntasks-per-node", "4", "--gpus-per-node", "2"],
     "--gpus-per-node=2: fewer GPUs than ranks per node (--ntasks-per-node=4)"),
    (["--gpus-per-node", "2", "--cpu"], "argument --cpu: not allowed with argument --gpus-per-node"),
])
def test_a_job_that_names_no_gpus_or_too_few_is_refused(args, message):
    done = _submit(*args, "--dry-run")
    assert done.returncode == 2 and message in done.stderr and "sbatch" not in done.stdout, done.stderr


def test_a_cpu_job_says_so_and_requests_no_gpus(tmp_path):
    done = _submit("--cpu", "--ntasks-per-node", "2", "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "--ntasks=2" in done.stdout and "--gpus" not in done.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stop_signal_checkpoints_requeues_and_the_job_finishes_where_it_stopped(tmp_path):
    slurm_is_up()
    dataset = make_dataset(tmp_path)
    run_dir = tmp_path / "run"
    # 40 bare steps take ~0.2 s, less than the signal takes to arrive: the run must still be going when it
    # does (CI once saw it finish first). From step 4 on every rank sleeps ~0.1 s a step (a `slow` fault
    # is from step K on, resumed runs included): the signal lands with ~30 steps to spare.
    slow = ",".join(f"slow:rank={r}:step=4:factor=30" for r in range(2))
    done = _submit("--cpu", "--ntasks-per-node", "2", "--overcommit", "--run-dir", str(run_dir), "--set", *TRAIN,
                   "train.steps=40", f"data.inputs=[{dataset}]", f"data.cache_dir={tmp_path / 'cache'}",
                   f"resilience.inject=[{slow}]")
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[-1]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    # What Slurm does 90 s before the time limit (#SBATCH --signal=B:USR1@90), now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait_for_job(job)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log
    assert "USR1: asking the ranks to checkpoint and stop" in log
    assert f"stopped at a checkpoint on request; requeueing job {job}" in log
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (stop,) = [e for e in events if e["type"] == "preempted"]
    (resume,) = [e for e in events if e["type"] == "resume"]
    assert resume["step"] == stop["step"] < 40  # resumed from the stop checkpoint itself
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # no step lost, none repeated

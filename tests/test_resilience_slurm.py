"""Under Slurm there is no elastic agent: a killed rank ends the srun step (--kill-on-bad-exit), the
batch script requeues the job, and the requeued run resumes and finishes. A real sbatch job on the
local one-node cluster (scripts/slurm-local.sh start); 50-70 s on the shared 2-core box, most of it
Slurm's requeue latency, hence marked slow (run with -m slow).

srun reports the highest status of its tasks, so the requeue decision reads the ranks' own exit
records (slurm/requeue.py): a rank that exits 2 while srun kills the other is never requeued (a
real job, ~10 s), and the decision's rules are checked as a function."""
import json
import re
import subprocess
import sys

import pytest

from data_pipeline.words_corpus import make_dataset
from engine.resilience.exit_records import attempt_of, read_exits, record_exit
from slurm.requeue import decide
from tests.test_launch import ROOT, launcher_env, slurm_is_up, wait_for_job

TRAIN = ["train.steps=6", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "checkpoint.interval=2", "logging.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_requeues_the_sbatch_job_which_resumes_and_finishes(tmp_path):
    slurm_is_up()
    dataset = make_dataset(tmp_path)
    run_dir, log = tmp_path / "run", tmp_path / "slurm.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--overcommit", "--ntasks=2", f"--output={log}",
         f"--export=ALL,APOGEE_PYTHON={sys.executable}", "slurm/apogee.sbatch", "--run-dir", str(run_dir),
         "--set", *TRAIN, f"data.inputs=[{dataset}]", f"data.cache_dir={tmp_path / 'cache'}",
         "resilience.inject=[kill:rank=1:step=3]", "resilience.max_restarts=0"],
        capture_output=True, text=True, cwd=ROOT, env=launcher_env(), timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    state = wait_for_job(job_id)
    output = log.read_text()
    assert state == "COMPLETED", output
    assert f"requeueing job {job_id} (restart 1)" in output
    assert f"run 1 of job {job_id} after a requeue" in output
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (failure,) = [e for e in events if e["type"] == "failure"]
    assert (failure["cause"], failure["rank"], failure["step"]) == ("kill", 1, 3)
    (restart,) = [e for e in events if e["type"] == "restart"]
    assert (restart["launcher"], restart["restart_count"]) == ("slurm", 1)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps.count(3) == 1  # step 3 never completed before the kill


# An external stage (apogee run module:Stage) whose rank 1 refuses its input: the other rank is
# then in the rendezvous, waiting for it, when srun stops it (SIGTERM, status 143). Each rank
# first writes down the binding srun gave it.
RANK_ONE_REFUSES = """
import json
import os
from pathlib import Path

from engine.config import ConfigError
from stages.pretrain import PretrainStage


class RankOneRefuses(PretrainStage):
    name = "rank_one_refuses"

    def validate(self, cfg, world_size):
        rank = os.environ["SLURM_PROCID"]
        seen = {name: os.environ.get(name) for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPU_BIND_TYPE")}
        (Path(__file__).parent / f"binding-{rank}.json").write_text(json.dumps(seen))
        if rank == "1":
            raise ConfigError("rehearsed: rank 1 refuses its input")
"""


@pytest.mark.distributed
def test_a_rank_that_exits_2_while_srun_kills_the_other_is_not_requeued(tmp_path):
    slurm_is_up()
    (tmp_path / "rank_one_refuses.py").write_text(RANK_ONE_REFUSES)
    run_dir, log = tmp_path / "run", tmp_path / "slurm.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--overcommit", "--ntasks=2", f"--output={log}",
         f"--export=ALL,APOGEE_PYTHON={sys.executable},APOGEE_STAGE=rank_one_refuses:RankOneRefuses",
         "slurm/apogee.sbatch", "--run-dir", str(run_dir), "--set", "train.steps=2"],
        capture_output=True, text=True, cwd=ROOT, env=launcher_env(PYTHONPATH=str(tmp_path)), timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    state = wait_for_job(job_id)
    output = log.read_text()
    assert state == "FAILED", output
    job = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert "ExitCode=2:0" in job and "Restarts=0" in job, job
    assert "rehearsed: rank 1 refuses its input" in output and "requeueing job" not in output, output
    reported = re.search(r"rank 1 exited with status 2 \(config error\), srun reported (\d+)", output)
    assert reported and int(reported.group(1)) > 128, output  # srun's own status said "killed": retry
    statuses = {r["rank"]: r["status"] for r in read_exits(run_dir, f"slurm:{job_id}:0")}
    assert statuses[1] == 2 and statuses.get(0, 143) > 128, statuses
    for rank in (0, 1):  # srun's binding: one CPU each here (2 tasks overcommitted on the job's CPU), cores
        binding = json.loads((tmp_path / f"binding-{rank}.json").read_text())
        assert binding == {"SLURM_CPUS_PER_TASK": "1", "SLURM_CPU_BIND_TYPE": "cores"}, binding


def _record(rank, status, when, attempt="slurm:7:0"):
    return {"rank": rank, "status": status, "reason": "", "attempt": attempt, "time": when}


@pytest.mark.parametrize("srun_status, records, stop, expected", [
    (143, [_record(1, 2, 1.0), _record(0, 143, 2.0)], False, ("exit", 2)),       # bad input on one rank
    (137, [_record(0, 17, 1.0)], False, ("exit", 17)),                           # a fault diagnosed
    (143, [_record(0, 17, 1.0)], True, ("exit", 17)),                            # even after a stop request
    (143, [_record(1, 143, 1.0), _record(0, 1, 2.0)], False, ("retry", 143)),    # a kill: a restart may pass
    (137, [], False, ("retry", 137)),                                            # nobody recorded (SIGKILL)
    (143, [_record(0, 19, 1.0)], False, ("requeue", 19)),                        # stopped at a checkpoint
    (143, [], True, ("requeue", 19)),
    (2, [], False, ("exit", 2)),                                                 # every rank refused, unrecorded
    (0, [_record(0, 0, 1.0), _record(1, 0, 1.0)], False, ("exit", 0)),
])
def test_the_requeue_decision_goes_by_the_ranks_records_before_sruns_status(srun_status, records, stop, expected):
    decision = decide(srun_status, records, stop_requested=stop, world_size=2)
    assert (decision.action, decision.status) == expected, decision.reason


def test_the_batch_scripts_decision_names_nodes_confirmed_faulty_for_the_resubmission(tmp_path, capsys):
    from engine.resilience.faulty_nodes import record_faulty
    from slurm.requeue import main

    record_faulty(tmp_path, 3, 40, "abft", node="gpu-017")
    record_faulty(tmp_path, 1, 9, "replay", node="gpu-002")  # once: a transient, not excluded
    assert main(["decide", "--srun-status", "137", "--run-dir", str(tmp_path)], env={}) == 0
    assert "gpu-0" not in capsys.readouterr().err
    record_faulty(tmp_path, 3, 41, "abft", node="gpu-017")
    main(["decide", "--srun-status", "137", "--run-dir", str(tmp_path)], env={})
    out = capsys.readouterr()
    assert out.out.split() == ["retry", "137"]
    assert "node(s) gpu-017 confirmed faulty" in out.err and "--exclude=gpu-017" in out.err


def test_exit_records_of_an_earlier_attempt_are_not_read_for_this_one(tmp_path):
    first = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1"}
    record_exit(tmp_path, 1, 2, "config error", env=first)
    again = {**first, "SLURM_RESTART_COUNT": "1"}
    assert [r["status"] for r in read_exits(tmp_path, attempt_of(first))] == [2]
    assert read_exits(tmp_path, attempt_of(again)) == []  # the requeued run's own records only
    record_exit(tmp_path, 1, 143, "killed by SIGTERM", env=again)  # replaces the file, atomically
    assert [r["status"] for r in read_exits(tmp_path, attempt_of(again))] == [143]


BLOCKED_RANK = """
import select, sys
from engine.resilience.exit_records import ExitRecorder
from engine.resilience.recovery import report_signal

recorder = ExitRecorder(3, sys.argv[1], on_signal=report_signal)
print("ready", flush=True)
recorder.run(select.select, [], [], [], 60)  # stuck in C, as in a collective: no Python handler can run
"""


def test_a_rank_stuck_outside_python_records_sigterm_and_exits_at_once(tmp_path):
    import os
    import signal
    import time

    rank = subprocess.Popen([sys.executable, "-c", BLOCKED_RANK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=launcher_env())
    assert rank.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    os.kill(rank.pid, signal.SIGTERM)
    assert rank.wait(timeout=30) == 143
    assert time.monotonic() - sent < 20  # not after select's 60 s
    (record,) = read_exits(tmp_path)
    assert (record["rank"], record["status"], record["reason"]) == (3, 143, "killed by SIGTERM")
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["type"], event["rank"], event["signal"]) == ("signal", 3, "SIGTERM")

"""Under Slurm there is no elastic agent: a killed rank ends the srun step (--kill-on-bad-exit), the
batch script requeues the job, and the requeued run resumes and finishes. A real sbatch job on the
local one-node cluster (scripts/slurm-local.sh start); 50-70 s on the shared 2-core box, most of it
Slurm's requeue latency, hence marked slow (run with -m slow)."""
import json
import subprocess
import sys

import pytest

from data_pipeline.words_corpus import make_dataset
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

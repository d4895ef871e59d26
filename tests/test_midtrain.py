"""`apogee midtrain`: the WSD cooldown branch continues a run bit for bit and then decays; a
long-context extension starts from the weights only; both starts at once are refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.words_corpus import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "logging.tensorboard=false", "optim.schedule=wsd", "optim.warmup_steps=2", "optim.min_lr=0.0"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    dataset = make_dataset(tmp)
    data = [f"data.inputs=[{dataset}]", f"data.cache_dir={tmp / 'cache'}"]
    run = tmp / "main"
    done = _cli("pretrain", "--run-dir", str(run), "--set", *SMALL, *data, "train.steps=12", "checkpoint.interval=4")
    assert done.returncode == 0, done.stderr
    return run, data


def test_the_cooldown_branch_continues_the_run_then_decays(main_run, tmp_path):
    main, data = main_run
    branch = tmp_path / "anneal"
    done = _cli("midtrain", "--run-dir", str(branch), "--set", *SMALL, *data, "train.steps=12",
                f"midtrain.branch_from={main}/checkpoints/step_00000008")
    assert done.returncode == 0, done.stderr
    main_steps, steps = {r["step"]: r for r in _metrics(main)}, _metrics(branch)
    assert [r["step"] for r in steps] == [9, 10, 11, 12]
    # Same weights, moments and data at step 9, and the decay starts at 8 with factor 1 there.
    assert steps[0]["loss"] == main_steps[9]["loss"] and steps[0]["lr"] == main_steps[9]["lr"]
    lrs = [r["lr"] for r in steps]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # decaying towards min_lr
    assert main_steps[10]["lr"] == main_steps[9]["lr"]  # the main run was still in its stable phase
    # A second start of the branch resumes from its own checkpoint, not from the branch point: it
    # is already at step 12, so there is nothing to train (exit 2, saying so), until train.steps grows.
    again = _cli("midtrain", "--run-dir", str(branch), "--set", *SMALL, *data, "train.steps=12",
                 f"midtrain.branch_from={main}/checkpoints/step_00000008")
    assert again.returncode == 2 and "train.steps=12: the run starts from step 12" in again.stderr
    further = _cli("midtrain", "--run-dir", str(branch), "--set", *SMALL, *data, "train.steps=13",
                   f"midtrain.branch_from={main}/checkpoints/step_00000008")
    assert further.returncode == 0 and "(step 12)" in further.stdout, further.stderr
    assert [(r["step"], r["attempt"]) for r in _metrics(branch)][-2:] == [(12, 1), (13, 2)]


def test_a_longer_context_starts_from_the_weights_only(main_run, tmp_path):
    main, data = main_run
    run = tmp_path / "long"
    scaling = "model.rope_scaling={factor: 2.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 32}"
    done = _cli("midtrain", "--run-dir", str(run), "--set", *SMALL, *data, "model.seq_length=64", scaling,
                "train.steps=4", f"train.init_from={main}/checkpoints")
    assert done.returncode == 0, done.stderr
    assert f"weights from {main}/checkpoints (apogee weights)" in done.stdout
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # a fresh step count
    assert records[0]["loss"] < 4.5  # far below a fresh model's ~5.9: the weights carried over


@pytest.mark.parametrize("sets, message", [
    ([], "`apogee midtrain` starts from one pre-trained run: set exactly one"),
    (["midtrain.branch_from=a", "train.init_from=b"], "set exactly one"),
    (["midtrain.branch_from=nowhere"], "midtrain.branch_from='nowhere': not an intact checkpoint (no such directory)"),
])
def test_a_midtrain_run_needs_one_start(tmp_path, sets, message):
    done = _cli("midtrain", "--run-dir", str(tmp_path / "r"), *(["--set", *sets] if sets else []))
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_other_stages_refuse_a_branch_point(tmp_path):
    done = _cli("pretrain", "--run-dir", str(tmp_path / "r"), "--set", "midtrain.branch_from=x")
    assert done.returncode == 2 and "a branch is started by `apogee midtrain`" in done.stderr

"""The red-team suite, part 2 (issue 14): run directories and checkpoints, each case held to the
behaviour it must keep. The shared helpers and fixtures are tests/test_bad_inputs.py's."""

import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from engine.resilience.exit_codes import restart_helps
from tests.test_launch import launcher_env
from tests.tmpfs import mounted_tmpfs

from tests.test_bad_inputs import (ROOT, TINY, apogee, assert_one_clear_line, corpus, error_lines,  # noqa: F401
                                   no_peak_measurement, read_only_dir, train_args, write_jsonl)


# -- Run directories and checkpoints --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus):
    """A run with checkpoints at steps 1, 2 and 3 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    status = main(["pretrain", *map(str, train_args(corpus, run_dir, "train.steps=3", "checkpoint.interval=1",
                                                    "checkpoint.async_save=false"))])
    assert status == 0
    return run_dir


def copy_run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run", symlinks=True))


def steps_of(run_dir: Path, kind: str) -> list:
    from engine.train.events import EventLog

    return [e["step"] for e in EventLog(run_dir, 0).read() if e.get("type") == kind]  # torn lines skipped


def test_resume_never_in_a_directory_with_checkpoints_exits_2_and_keeps_them(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    metrics = (run_dir / "metrics.jsonl").read_text()
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"), "--resume", "never")
    assert_one_clear_line(status, err, "--resume never", "--overwrite")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_second_run_on_the_same_run_directory_exits_2_naming_the_holder(tmp_path, capsys, corpus):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "cli.main", "pretrain",
                              *map(str, train_args(corpus, run_dir, "train.steps=100000"))],
                             cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.2)
        config = (run_dir / "config.yaml").read_text()
        status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "seed=7"))
        assert_one_clear_line(status, err, str(first.pid))
        assert (run_dir / "config.yaml").read_text() == config and first.poll() is None
    finally:
        first.kill()
        first.wait()


class _Payload:
    """Unpickling this creates the marker file: proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_manifest(step_dir: Path, name: str) -> None:
    """What an attacker does: update the manifest's size and SHA-256 of the tampered file."""
    from engine.state.manifest import file_sha256

    manifest_path = step_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def update(node):
        if isinstance(node, dict):
            if name in node and isinstance(node[name], dict) and "sha256" in node[name]:
                node[name].update(bytes=(step_dir / name).stat().st_size, sha256=file_sha256(step_dir / name))
            for value in node.values():
                update(value)
        elif isinstance(node, list):
            for value in node:
                update(value)

    update(manifest)
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture
def crafted_checkpoint(tmp_path, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    step = run_dir / "checkpoints" / "step_00000003"
    marker = tmp_path / "payload-ran"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    _rewrite_manifest(step, ".metadata")
    return step, marker


@pytest.mark.parametrize("how", ["export", "init_from", "branch_from", "resume"])
def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys, corpus, crafted_checkpoint, how):
    step, marker = crafted_checkpoint
    if how == "export":
        argv = ["export", "--checkpoint", step, "--to", "hf", "--out", tmp_path / "hf"]
    elif how == "init_from":
        argv = ["sft", "--run-dir", tmp_path / "sft", "--set", *TINY, f"train.init_from={step}",
                f"sft.inputs=[{write_jsonl(tmp_path / 'sft.jsonl', [{'prompt': 'a', 'response': 'b'}])}]"]
    elif how == "branch_from":
        argv = ["midtrain", *train_args(corpus, tmp_path / "branch", "train.steps=4", f"midtrain.branch_from={step}")]
    else:
        argv = ["pretrain", *train_args(corpus, tmp_path / "other", "train.steps=4", "checkpoint.allow_other_run=true"),
                "--resume", step]
    status, _, err = apogee(capsys, *argv)
    assert not marker.exists(), "the checkpoint's pickle ran its payload"
    assert_one_clear_line(status, err, ".metadata")


def test_resume_takes_the_newest_intact_checkpoint_whatever_latest_says(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000001")
    (run_dir / "checkpoints" / "latest").write_text("step_00000001\n")  # names a missing older step
    status, out, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"))
    assert status == 0, err
    assert steps_of(run_dir, "resume")[-1] == 3 and "latest" in out + err


@pytest.mark.parametrize("damage", ["flipped", "empty"])
def test_a_corrupt_manifest_of_any_kind_falls_back_to_the_older_checkpoint(tmp_path, capsys, corpus, trained_run,
                                                                           damage):
    run_dir = copy_run(trained_run, tmp_path)
    manifest = run_dir / "checkpoints" / "step_00000003" / "manifest.json"
    manifest.write_bytes(bytes(b ^ 0xFF for b in manifest.read_bytes()) if damage == "flipped" else b"{}")
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"))
    assert status == 0, err
    assert steps_of(run_dir, "resume")[-1] == 2


def test_when_no_checkpoint_is_intact_the_run_stops_listing_them(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    for step in (run_dir / "checkpoints").glob("step_*"):
        (step / "manifest.json").write_text("{}")
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"))
    assert status == 2, err
    assert all(f"step_0000000{k}" in err for k in (1, 2, 3)), err
    assert all((step / "manifest.json").read_text() == "{}" for step in (run_dir / "checkpoints").glob("step_*"))


def test_a_torn_last_event_line_does_not_stop_a_resume(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    with open(run_dir / "events.jsonl", "a") as events:
        events.write('{"type": "checkpoint_saved", "ra')  # a node died mid-write
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"))
    assert status == 0, err
    assert steps_of(run_dir, "resume")[-1] == 3


def test_a_run_that_starts_at_or_past_train_steps_says_so(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=3"))
    assert_one_clear_line(status, err, "train.steps=3")


def test_metrics_rows_carry_their_attempt(tmp_path, capsys, corpus, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=4"))
    assert status == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step3 = [row for row in rows if row["step"] == 3]
    assert len(step3) == 2 and step3[0].get("attempt") is not None and step3[0]["attempt"] != step3[1]["attempt"]


def test_a_read_only_run_directory_is_refused_before_training(tmp_path, capsys, corpus, read_only_dir):
    status, out, err = apogee(capsys, "pretrain", *train_args(corpus, read_only_dir))
    assert_one_clear_line(status, err, str(read_only_dir), "read-only file system")
    assert "rank(s) via" not in out


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=12m") as folder:
        yield folder


def test_disk_full_while_checkpointing_stops_in_one_line_keeps_the_last_good_one_and_resumes(tmp_path, capsys, corpus,
                                                                                             trained_run, small_disk):
    run_dir = Path(shutil.copytree(trained_run, small_disk / "run"))
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as f:  # leave a few KiB: the config and logs fit, a checkpoint does not
        f.write(b"\0" * max(0, free - 16 * 1024))
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=5", "checkpoint.interval=1",
                                                            "checkpoint.async_save=false"))
    assert status not in (0, 1, 2) and not restart_helps(status), err
    assert len(error_lines(err)) == 1 and "no space left" in err and "Traceback" not in err, err
    assert not list((run_dir / "checkpoints").glob("*.partial*"))
    filler.unlink()
    status, _, err = apogee(capsys, "pretrain", *train_args(corpus, run_dir, "train.steps=5"))
    assert status == 0, err
    assert steps_of(run_dir, "resume")[-1] == 3

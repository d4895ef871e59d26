"""A run directory belongs to one run at a time: the lock (a second live run exits 2 naming the
holder, a dead holder's lock is taken over with a line naming it), `--resume never` where
checkpoints exist exits 2 saying how to start over, `--overwrite` moves the old run aside, a run
already past train.steps exits 2, metrics rows carry their attempt, a torn events.jsonl line never
stops a restart, and read-only run, checkpoint and cache directories are refused before training."""
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.job.run_lock import LOCK_FILE, RunDirLocked, RunLock
from engine.train.events import EventLog

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=2",
         "train.global_batch_size=4", "checkpoint.interval=1", "logging.tensorboard=false"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_pipeline.words_corpus import make_dataset

    tmp = tmp_path_factory.mktemp("rundir")
    return [f"data.inputs=[{make_dataset(tmp)}]", f"data.cache_dir={tmp / 'cache'}"]


def _pretrain(run_dir, data, *sets, flags=()):
    return _cli("pretrain", "--run-dir", str(run_dir), *flags, "--set", *SMALL, *data, *sets)


def _plant(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "started": time.time(),
              "slurm_job": None, "command": "apogee pretrain (planted)", "token": "t", **holder}
    (run_dir / LOCK_FILE).write_text(json.dumps(record))


# -- the lock ---------------------------------------------------------------------------------------

def test_a_second_live_run_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked) as refused:
            RunLock(tmp_path).acquire()
    assert f"run directory {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()}" in str(refused.value)
    with RunLock(tmp_path):  # released on exit: the next run takes it
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_line_naming_it(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(tmp_path, pid=int(dead.stdout))
    lines = []
    lock = RunLock(tmp_path, report=lines.append).acquire()
    lock.release()
    assert len(lines) == 1 and f"from pid {dead.stdout.strip()} on host {socket.gethostname()}" in lines[0]
    assert "no longer exists" in lines[0] and "apogee pretrain (planted)" in lines[0]


@pytest.mark.parametrize("age_s, taken", [(3600, True), (5, False)], ids=["stale-heartbeat", "fresh-heartbeat"])
def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path, age_s, taken):
    _plant(tmp_path, host="some-other-node", pid=1)
    past = time.time() - age_s
    os.utime(tmp_path / LOCK_FILE, (past, past))
    lines = []
    if taken:
        RunLock(tmp_path, report=lines.append).acquire().release()
        assert "from pid 1 on host some-other-node" in lines[0] and "heartbeat is 3600 s old" in lines[0]
    else:
        with pytest.raises(RunDirLocked, match="in use by pid 1 on host some-other-node"):
            RunLock(tmp_path, report=lines.append).acquire()


def test_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    _plant(tmp_path, host="node-that-died", pid=4242, slurm_job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lines = []
    RunLock(tmp_path, report=lines.append).acquire().release()
    assert "an earlier run of this Slurm job (777)" in lines[0]


def test_the_heartbeat_touches_the_lock(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    past = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (past, past))
    time.sleep(0.3)
    age = time.time() - (tmp_path / LOCK_FILE).stat().st_mtime
    lock.release()
    assert age < 100


def test_a_live_run_on_the_directory_makes_the_command_exit_2(tmp_path, data):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):  # this test process is the live holder
        done = _pretrain(tmp_path / "run", data, "train.steps=1")
    assert done.returncode == 2
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in done.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written by the refused run


# -- starting over, and what the run starts from -------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("finished") / "run"
    done = _pretrain(run, data, "train.steps=2")
    assert done.returncode == 0, done.stderr
    return run


def test_resume_never_where_checkpoints_exist_exits_2_and_overwrite_moves_the_run_aside(tmp_path, data, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    refused = _pretrain(run, data, "train.steps=2", flags=("--resume", "never"))
    assert refused.returncode == 2
    assert "--resume never" in refused.stderr and "already holds checkpoints (steps 0, 1, 2)" in refused.stderr
    assert "new --run-dir" in refused.stderr and "--overwrite" in refused.stderr
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    done = _pretrain(run, data, "train.steps=1", flags=("--overwrite",))
    assert done.returncode == 0, done.stderr
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert f"moved {run} aside to {aside}" in done.stdout
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before  # kept whole
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (aside / "run_id").read_text() != (run / "run_id").read_text()


def test_a_run_not_beyond_its_start_step_exits_2(tmp_path, data, finished):
    done = _pretrain(finished, data, "train.steps=2")
    assert done.returncode == 2
    assert "train.steps=2: the run starts from step 2" in done.stderr and "nothing to train" in done.stderr
    branch = _cli("midtrain", "--run-dir", str(tmp_path / "b"), "--set", *SMALL, *data, "train.steps=1",
                  f"midtrain.branch_from={finished}/checkpoints/step_00000002")
    assert branch.returncode == 2 and "train.steps=1: the run starts from step 2" in branch.stderr


def test_metrics_rows_carry_their_attempt_and_a_torn_events_line_does_not_stop_the_resume(tmp_path, data, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")  # step 2 is re-run and logged again
    with open(run / "events.jsonl", "ab") as f:
        f.write(b'{"type": "checkpoint_saved", "rank": 0, "ti')  # a node died mid-write
    done = _pretrain(run, data, "train.steps=3")
    assert done.returncode == 0, done.stderr
    assert "events.jsonl last line is torn or unreadable" in done.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["attempt"]) for r in rows] == [(1, 1), (2, 1), (2, 2), (3, 2)]
    events = EventLog(run, 0).read()  # the torn line stays on its own line, skipped
    assert [e["attempt"] for e in events if e["type"] == "start"] == [1, 2]
    lines = (run / "events.jsonl").read_bytes().split(b"\n")
    assert b'{"type": "checkpoint_saved", "rank": 0, "ti' in lines


def test_a_torn_last_line_is_skipped_with_a_note_and_the_next_event_starts_a_line(tmp_path, capsys):
    log = EventLog(tmp_path, 0)
    log.record("start", step=0)
    with open(log.path, "ab") as f:
        f.write(b'{"type": "che')
    assert [e["type"] for e in log.read()] == ["start"]
    assert "last line is torn" in capsys.readouterr().err
    log.record("resume", step=0)
    assert [e["type"] for e in EventLog(tmp_path, 1).read()] == ["start", "resume"]
    assert "line 2 is torn" in capsys.readouterr().err


# -- unwritable directories -------------------------------------------------------------------------

@contextmanager
def read_only_mount(path: Path):
    """A small tmpfs at `path`, remounted read-only (root writes through permission bits)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here ({mounted.stderr.decode().strip()}); a read-only mount is needed")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("where, key", [("run", "--run-dir"), ("ckpt", "checkpoint.dir"), ("cache", "data.cache_dir")])
def test_a_read_only_directory_is_refused_before_training_starts(tmp_path, data, where, key):
    with read_only_mount(tmp_path / "ro") as ro:
        run, sets = tmp_path / "run", ["train.steps=1"]
        if where == "run":
            run = ro / "run"
        elif where == "ckpt":
            sets.append(f"checkpoint.dir={ro}/ckpt")
        else:
            sets = [s for s in [*sets, f"data.cache_dir={ro}/cache"]]
        done = _pretrain(run, [d for d in data if not (where == "cache" and d.startswith("data.cache_dir"))], *sets)
    assert done.returncode == 2, done.stderr
    assert f"{key}=" in done.stderr and "not writable (read-only file system" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (run / "metrics.jsonl").exists()

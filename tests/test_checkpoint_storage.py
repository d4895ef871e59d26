"""Disk full: a checkpoint the storage refuses leaves no partial directory and the older ones
intact, is reported in one line (path, bytes needed, bytes free), ends the run with
STORAGE_FAILED (20), which neither the launcher nor the Slurm script restarts, and the run resumes
with the same command once space is freed. Tested on a 12 MiB tmpfs (root writes through
permission bits; mount must be permitted, else the test skips saying so)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.resilience.exit_codes import NO_RESTART, STORAGE_FAILED, restart_helps
from engine.state.checkpoint_store import CheckpointStore, verify
from engine.train.events import EventLog
from tests.tmpfs import mounted_tmpfs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=2",
         "train.global_batch_size=4", "checkpoint.interval=2", "logging.tensorboard=false"]


def small_disk(path: Path, size: str = "12m"):
    """A tmpfs of `size` at `path` (a context manager)."""
    return mounted_tmpfs(path, f"size={size}")


def _pretrain(run_dir, data, *sets, nproc=1):
    return subprocess.run([sys.executable, "-m", "cli.main", "pretrain", "--nproc", str(nproc), "--run-dir",
                           str(run_dir), "--set", *SMALL, *data, *sets],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.distributed
def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_space_is_freed(tmp_path):
    from data_pipeline.words_corpus import make_dataset
    from engine.state.export import load_model

    data = [f"data.inputs=[{make_dataset(tmp_path)}]", f"data.cache_dir={tmp_path / 'cache'}"]
    with small_disk(tmp_path / "disk") as disk:
        run = disk / "run"
        first = _pretrain(run, data, "train.steps=2")
        assert first.returncode == 0, first.stderr
        store = CheckpointStore(run / "checkpoints")
        last_good = store.published()[-1]
        assert last_good.step == 2
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        with open(filler, "wb") as f:  # leave less room than a checkpoint needs
            f.truncate(0)
            f.write(b"\0" * (free - (1 << 20)))

        full = _pretrain(run, data, "train.steps=4", nproc=2)
        assert full.returncode == STORAGE_FAILED == 20, (full.returncode, full.stderr[-3000:])
        errors = [line for line in full.stderr.splitlines() if line.startswith("apogee: error:")]
        assert len(errors) == 1, full.stderr
        assert "Traceback" not in full.stderr and "restarting all" not in full.stderr
        assert "a restart would meet it again, not restarting" in full.stderr
        assert re.search(r"writing the checkpoint of step 4 failed: no space left \(" + re.escape(str(run)) +
                         r"/checkpoints/step_00000004\.partial-\w+-4(/__\d_0\.distcp)?: needs about [\d.]+ MiB, "
                         r"[\d.]+ (KiB|MiB) free there\); the partial checkpoint was removed, earlier ones are "
                         r"untouched \(newest: step 2\); a restart cannot fix this", errors[0]), errors[0]
        assert not list((run / "checkpoints").glob("*.partial-*"))
        assert [i.step for i in store.published()][-1] == 2 and verify(last_good.path) is None
        assert load_model(last_good.path) is not None  # the last good checkpoint is loadable
        events = EventLog(run, 0).read()  # readable, torn or not
        assert not [e for e in events if e["type"] == "restart"]
        assert [e for e in events if e["type"] == "failure"][-1]["exit_code"] == 20

        filler.unlink()  # space freed: the same command resumes, nothing repaired by hand
        again = _pretrain(run, data, "train.steps=4", nproc=2)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout and "(step 2)" in again.stdout
        assert store.published()[-1].step == 4 and verify(store.published()[-1].path) is None
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert max(r["step"] for r in rows) == 4


def test_a_refused_event_write_is_a_storage_error(tmp_path):
    from engine.state.errors import StorageError

    with small_disk(tmp_path / "disk", size="64k") as disk:
        log = EventLog(disk, 0)
        log.record("start", step=0)
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 10))
        with pytest.raises(StorageError, match=r"recording a 'checkpoint_saved' event failed: no space left"):
            log.record("checkpoint_saved", step=1, padding="x" * 8192)
        assert [e["type"] for e in log.read()] == ["start"]


def _exit_with(status: int, attempts_dir: str) -> None:
    """An elastic-agent entrypoint that counts its attempts and exits with `status`."""
    attempts = Path(attempts_dir)
    (attempts / f"attempt-{len(list(attempts.iterdir()))}").write_text("")
    sys.exit(status)


@pytest.mark.parametrize("status, attempts", [(STORAGE_FAILED, 1), (2, 1), (1, 2)])
def test_the_launcher_restarts_only_what_a_restart_can_fix(tmp_path, status, attempts):
    from engine.job.launch import launch_local

    assert launch_local(1, _exit_with, (status, str(tmp_path)), max_restarts=1) == status
    assert len(list(tmp_path.iterdir())) == attempts


def test_the_slurm_script_requeues_none_of_the_statuses_no_restart_fixes():
    script = (ROOT / "slurm" / "apogee.sbatch").read_text()
    final = re.search(r"case \$status in\s+([\d|]+)\) action=exit", script)  # srun's status, no records
    assert final and {int(s) for s in final.group(1).split("|")} == set(NO_RESTART)
    assert not restart_helps(STORAGE_FAILED)
    from slurm.requeue import decide

    # The ranks' records decide first: a rank that left 20 stops the job whatever srun reports (143).
    decision = decide(143, [{"rank": 1, "status": STORAGE_FAILED, "time": 1.0}, {"rank": 0, "status": 143, "time": 2.0}])
    assert (decision.action, decision.status) == ("exit", STORAGE_FAILED)

"""Checkpoints that scale: each rank hashes the files it wrote and the manifest merges the digests;
verifying at resume costs each rank its own files (the answers combined, the same on every rank);
writing and verifying count as progress for the hang watchdog; the collective timeout is a config
key and the SIGUSR1 lead time an `apogee submit` option."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.resilience.watchdog import Watchdog

ROOT = Path(__file__).resolve().parents[1]


def _save_and_verify_on_two_ranks(rank, world_size, root):
    import engine.state.manifest as manifest_module
    from engine.state.checkpoint import Checkpointer
    from engine.state.checkpoint_store import CheckpointStore
    from engine.state.resume import newest_intact_for_all
    from engine.state.views import GlobalShards
    from parallel.collectives import CommLedger, barrier, world_group

    beats = []
    store = CheckpointStore(Path(root) / "ckpt")
    checkpointer = Checkpointer(store, rank, world_size, "scale", progress=lambda: beats.append(1))
    rows = 256  # 256 x 4096 fp32 rows per rank: 4 MiB, hashed in one chunk or more
    for step in (1, 2):
        piece = torch.full((rows, 4096), float(rank + step))
        checkpointer.save_views({"model/w": GlobalShards((rows * world_size, 4096), [((rank * rows, 0), piece)])},
                                {"note": step}, step, {"model": {}}, blocking=True)
    world = world_group(CommLedger())
    if rank == 1:  # rank 1's file of the newest checkpoint is damaged on disk
        damaged = store.published()[-1].path / "__1_0.distcp"
        damaged.write_bytes(damaged.read_bytes()[:-8] + b"garbage!")
    barrier(world)
    hashed = []
    real = manifest_module.file_sha256

    def recording(path, progress=manifest_module.no_progress):
        hashed.append(Path(path).name)
        return real(path, progress)
    manifest_module.file_sha256 = recording
    reports = []
    chosen = newest_intact_for_all(store, checkpointer.group, rank, checkpointer.progress, reports.append)
    manifest_module.file_sha256 = real
    manifest = json.loads((store.published()[-1].path / "manifest.json").read_text())
    return {"chosen": chosen.step, "hashed": sorted(set(hashed)), "reports": reports, "beats": len(beats),
            "manifest": manifest}


@pytest.mark.distributed
def test_each_rank_hashes_and_verifies_its_own_files_and_all_agree(tmp_path):
    from tests.distributed import run_distributed

    ranks = run_distributed(_save_and_verify_on_two_ranks, 2, str(tmp_path), timeout=300)
    manifest = ranks[0]["manifest"]
    assert manifest["format"] == 2
    assert {name: entry["rank"] for name, entry in manifest["files"].items()} == \
        {".metadata": 0, "__0_0.distcp": 0, "__1_0.distcp": 1}
    # Both ranks find step 2 damaged (only rank 1 read the damaged file) and agree on step 1.
    assert [r["chosen"] for r in ranks] == [1, 1]
    assert ranks[0]["reports"] and "__1_0.distcp does not match its checksum" in ranks[0]["reports"][0]
    assert ranks[0]["hashed"] == [".metadata", "__0_0.distcp"] and ranks[1]["hashed"] == ["__1_0.distcp"]
    assert all(r["beats"] >= 2 for r in ranks)  # writing and hashing told the watchdog


def test_checkpoint_progress_resets_the_watchdog_clock_without_counting_a_step(tmp_path):
    from engine.state.checkpoint import Checkpointer
    from engine.state.checkpoint_store import CheckpointStore
    from engine.state.views import GlobalShards

    watchdog = Watchdog(None, 0, 300.0)
    watchdog.alive()  # before the first beat: nothing armed, nothing to reset
    assert watchdog.steps_completed is None
    watchdog.beat(7)
    armed_at = watchdog._beat[1]
    calls = []

    def progress():
        calls.append(1)
        watchdog.alive()
    checkpointer = Checkpointer(CheckpointStore(tmp_path), 0, 1, "run", progress=progress)
    big = torch.zeros(3 * 2**20)  # 12 MiB: several 4 MiB hash chunks
    checkpointer.save_views({"model/w": GlobalShards(big.shape, [((0,), big)])}, {}, 1, {}, blocking=True)
    assert len(calls) >= 3
    assert watchdog.steps_completed == 7 and watchdog._beat[1] > armed_at


def test_the_collective_timeout_is_a_config_key_given_to_the_process_groups(monkeypatch):
    from engine.config import ConfigError, load_config
    from engine.config_validation import validate
    from engine.job import runner
    from stages.pretrain import PretrainStage

    with pytest.raises(ConfigError, match=r"resilience.collective_timeout_s=0.0: must be > 0"):
        validate(load_config(None, ["resilience.collective_timeout_s=0"]), 1)
    seen = {}

    class Joined(Exception):
        pass

    def fake_init(info, timeout_s=None):
        seen["timeout_s"] = timeout_s
        raise Joined()
    monkeypatch.setattr(runner, "init_distributed", fake_init)
    cfg = load_config(None, ["resilience.collective_timeout_s=42"])
    with pytest.raises(Joined):
        runner.worker_main(cfg.to_dict(), PretrainStage(), "unused", [], "auto", None)
    assert seen["timeout_s"] == 42.0
    made = {}
    monkeypatch.setattr("engine.state.checkpoint.new_cpu_group", lambda timeout_s=None: made.update(t=timeout_s))
    from engine.state.checkpoint import Checkpointer
    from engine.state.checkpoint_store import CheckpointStore
    Checkpointer(CheckpointStore("unused"), 0, 1, "run", timeout_s=42.0)
    assert made["t"] == 42.0


@pytest.mark.parametrize("flags, expected", [([], "--signal=B:USR1@90"), (["--signal-lead", "300"], "--signal=B:USR1@300")])
def test_submit_sets_the_sigusr1_lead_time(tmp_path, flags, expected):
    done = subprocess.run([sys.executable, "-m", "cli.main", "submit", "--dry-run", "--cpu", "--run-dir",
                           str(tmp_path / "r"), *flags], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_submit_refuses_a_lead_time_below_one_second(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.main", "submit", "--dry-run", "--signal-lead", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--signal-lead=0: must be >= 1" in done.stderr

"""Recovery from memory: the keeper's store, the snapshot format, and real 2-rank runs that lose a rank
and then a whole node (rank and keeper) and resume from memory, bitwise equal to a clean run."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from data_pipeline.words_corpus import make_dataset
from engine.state.export import load_model
from engine.state.memory_keeper import KEEP, Keeper, KeeperClient, KeeperError
from engine.state.memory_snapshots import decode, domain_of, encode, fill_views
from engine.state.views import GlobalShards

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes.fromhex("00" * 16)


@pytest.fixture
def keeper():
    server = Keeper("127.0.0.1", 0, KEY)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    server.stop()


def test_a_keeper_keeps_the_latest_sent_snapshots_per_rank_and_forgets_an_abandoned_run(keeper):
    client = KeeperClient(f"127.0.0.1:{keeper.address[1]}", KEY)
    for step in (2, 4, 6):
        client.put("run", 0, step, {"digest": str(step)}, bytes([step]) * 10)
    client.put("run", 1, 4, {}, b"x")
    assert client.steps("run") == {0: [4, 6][-KEEP:], 1: [4]}
    meta, data = client.get("run", 0, 6)
    assert meta["digest"] == "6" and data == bytes([6]) * 10
    client.drop_after("run", 0, 4)  # a rewind to step 4: step 6 belongs to the abandoned trajectory
    client.put("run", 0, 2, {}, b"again")  # sent after 4: the newest by arrival, though a lower step
    assert client.steps("run")[0] == [2, 4]
    client.put("run", 0, 4, {}, b"again")  # then 4 again: 2 is now the oldest sent and goes first
    client.put("run", 0, 6, {}, b"again")
    assert client.steps("run")[0] == [4, 6]
    with pytest.raises(KeeperError, match="no snapshot of rank 0 at step 2"):
        client.get("run", 0, 2)
    assert client.steps("other run") == {}


def test_a_keeper_refuses_a_connection_without_the_key(keeper):
    with pytest.raises(KeeperError):
        KeeperClient(f"127.0.0.1:{keeper.address[1]}", b"wrong key", timeout_s=5).steps("run")


def test_a_snapshot_round_trips_and_only_fits_the_views_it_was_taken_from():
    weight = torch.arange(12.0).reshape(3, 4)
    shards = GlobalShards((6, 4), [((3, 0), weight)])
    data = encode({"w": shards, "step": torch.tensor(7.0), "trainer": '{"step": 7}', "rng/0": torch.get_rng_state()})
    saved = decode(data)
    target = torch.zeros(3, 4)
    step = torch.zeros(())
    assert fill_views({"w": GlobalShards((6, 4), [((3, 0), target)]), "step": step}, saved) is None
    assert torch.equal(target, weight) and step.item() == 7.0
    elsewhere = torch.zeros(3, 4)  # the other half of the tensor: another rank's piece
    reason = fill_views({"w": GlobalShards((6, 4), [((0, 0), elsewhere)]), "step": step}, saved)
    assert reason == "w: no matching piece at offset (0, 0)" and not elsewhere.any()


def test_ranks_split_between_domains_as_nodes_hold_them():
    assert [domain_of(r, 8, 2) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [domain_of(r, 2, 2) for r in range(2)] == [0, 1]


STEPS = 30
TRAIN = [f"train.steps={STEPS}", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "checkpoint.interval=10", "logging.tensorboard=false",
         "resilience.max_restarts=2"]


def _pretrain(dataset: str, run_dir: Path, *settings: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli.main", "pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set", *TRAIN,
           f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APOGEE_KEEPER")}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """(dataset, the clean run's directory): the reference both fault runs must equal bitwise."""
    tmp = tmp_path_factory.mktemp("memory")
    dataset = make_dataset(tmp)
    _pretrain(dataset, tmp / "clean")
    return dataset, tmp / "clean"


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["type"] == kind]


def _assert_same_training(run_dir: Path, clean: Path) -> None:
    losses, reference = _losses(run_dir), _losses(clean)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses == reference  # bitwise
    last = f"checkpoints/step_{STEPS:08d}"
    weights, ref_weights = load_model(run_dir / last).state_dict(), load_model(clean / last).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())


@pytest.mark.distributed
def test_a_lost_rank_then_a_lost_node_resume_from_memory_bitwise(clean_run, tmp_path):
    dataset, clean = clean_run
    # Disk checkpoints every 10 steps, memory snapshots every 2: a kill at step 15 loses 1 step from
    # memory (5 from disk); the node loss at step 27 takes rank 1 and its keeper: rank 1's snapshot
    # comes from its peer's keeper (rank 0's domain).
    faulty = _pretrain(dataset, tmp_path / "faulty", "checkpoint.memory_interval=2",
                       "resilience.inject=[kill:rank=1:step=15, node_loss:rank=1:step=27]")
    resumes = _events(tmp_path / "faulty", "resume")
    # The newest complete set: step 14 (26), or 12 (24) when the dying rank was still sending 14's
    # (26's) in the background: one save is in flight at most, so never older than that.
    assert [r["source"] for r in resumes] == ["memory", "memory"], faulty.stdout
    assert resumes[0]["step"] in (12, 14) and resumes[1]["step"] in (24, 26), faulty.stdout
    assert [r["work_lost_steps"] for r in resumes] == [14 - resumes[0]["step"], 26 - resumes[1]["step"]]
    first, second = resumes[0]["keepers"], resumes[1]["keepers"]
    assert first[0] != first[1]  # each rank's own domain's keeper
    assert second[1] == second[0]  # rank 1's keeper was lost with its node: the peer's copy
    assert "memory keeper 1" in faulty.stderr and "is gone: starting an empty one" in faulty.stderr
    _assert_same_training(tmp_path / "faulty", clean)

"""Checkpoints never run code: a crafted pickle in a checkpoint (its manifest rewritten to match, as
an attacker would) is refused with exit 2 naming the file, through export, train.init_from,
midtrain.branch_from and --resume, and its payload (creating a marker file) never runs."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from engine.state.checkpoint import _plain_data
from engine.state.errors import UnsafeCheckpointError
from engine.state.safe_load import read_metadata, safe_load, single_process_quietly

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=2",
         "train.global_batch_size=4", "checkpoint.interval=1", "logging.tensorboard=false"]


class Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT)


def _rewrite_manifest(checkpoint: Path) -> None:
    """What an attacker does after planting a file: make the manifest match it."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_pipeline.words_corpus import make_dataset

    tmp = tmp_path_factory.mktemp("safety")
    data = [f"data.inputs=[{make_dataset(tmp)}]", f"data.cache_dir={tmp / 'cache'}"]
    good = tmp / "good"
    done = _cli("pretrain", "--run-dir", str(good), "--set", *SMALL, *data, "train.steps=2")
    assert done.returncode == 0, done.stderr
    evil = tmp / "evil"
    shutil.copytree(good, evil)
    marker = tmp / "PAYLOAD_RAN"
    checkpoint = evil / "checkpoints" / "step_00000002"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _rewrite_manifest(checkpoint)
    return {"data": data, "evil": evil, "checkpoint": checkpoint, "marker": marker, "tmp": tmp}


def _refused(done, runs):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-2000:])
    assert f"{runs['checkpoint']}/.metadata: refused: it asks to load posix.system" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not runs["marker"].exists(), "the payload ran"


def test_export_refuses_a_crafted_metadata_pickle(runs):
    _refused(_cli("export", "--checkpoint", str(runs["checkpoint"]), "--to", "hf",
                  "--out", str(runs["tmp"] / "hf")), runs)


def test_init_from_refuses_a_crafted_metadata_pickle(runs):
    _refused(_cli("pretrain", "--run-dir", str(runs["tmp"] / "init"), "--set", *SMALL, *runs["data"],
                  "train.steps=3", f"train.init_from={runs['evil']}/checkpoints"), runs)


def test_branch_from_refuses_a_crafted_metadata_pickle(runs):
    _refused(_cli("midtrain", "--run-dir", str(runs["tmp"] / "branch"), "--set", *SMALL, *runs["data"],
                  "train.steps=3", f"midtrain.branch_from={runs['checkpoint']}"), runs)


def test_resume_refuses_a_crafted_metadata_pickle(runs):
    _refused(_cli("pretrain", "--run-dir", str(runs["tmp"] / "other"), "--set", *SMALL, *runs["data"],
                  "train.steps=3", "checkpoint.allow_other_run=true", "--resume", str(runs["checkpoint"])), runs)
    _refused(_cli("pretrain", "--run-dir", str(runs["evil"]), "--set", *SMALL, *runs["data"], "train.steps=3"), runs)


def test_a_crafted_trainer_state_inside_a_data_file_is_refused_naming_it(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    with single_process_quietly():
        dcp.save({"w": torch.ones(3), "trainer": Payload(marker)}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    holder = {"w": torch.zeros(3), "trainer": ""}
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0.distcp: refused: entry 'trainer' is not plain data"):
        safe_load(holder, tmp_path / "ck", no_dist=True)
    assert not marker.exists()


def test_dcp_metadata_of_a_real_checkpoint_is_admitted(tmp_path):
    state = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "rng/0": torch.get_rng_state(), "trainer": '{"a": 1}'}
    with single_process_quietly():
        dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    metadata = read_metadata(tmp_path / "ck")
    assert set(metadata.state_dict_metadata) == {"w", "rng/0", "trainer"}
    holder = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "rng/0": torch.empty(state["rng/0"].shape, dtype=torch.uint8),
              "trainer": ""}
    safe_load(holder, tmp_path / "ck", no_dist=True)
    assert torch.equal(holder["w"], state["w"]) and torch.equal(holder["rng/0"], state["rng/0"])
    assert holder["trainer"] == '{"a": 1}'


def test_an_older_pickled_trainer_state_loads_and_a_crafted_one_is_refused(tmp_path):
    legacy = {"skip_steps": [3], "seed": 1, "resilience": {"detector": {"losses": [2.5, float("nan")]}},
              "fp8": {}, "step": 4}
    loaded = _plain_data(pickle.dumps(legacy), "checkpoint X")
    assert loaded["skip_steps"] == [3] and loaded["step"] == 4 and loaded["resilience"]["detector"]["losses"][0] == 2.5
    with pytest.raises(UnsafeCheckpointError, match="checkpoint X: refused: the trainer state asks to load posix.system"):
        _plain_data(pickle.dumps(Payload(tmp_path / "m")), "checkpoint X")
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """Format 1 (before this change): trainer state as a pickle of plain data, RNG as a pickled
    tensor, no writer ranks in the manifest. It loads: the plain data without any global, the RNG
    state left as it is (a pickled tensor would need torch's unrestricted unpickler)."""
    from engine.state.checkpoint import Checkpointer
    from engine.state.checkpoint_store import CheckpointStore
    from engine.state.views import GlobalShards, state_views
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from tests.parity import FakeData, parity_config

    cfg = parity_config([], 1, 2)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg), run_dir=tmp_path / "run")
    trainer.train_step(0)
    snapshot = {k: (v.snapshot() if isinstance(v, GlobalShards) else v.detach().clone())
                for k, v in state_views(trainer).items()}
    snapshot["trainer"] = pickle.dumps({**trainer.checkpoint_extra_state(), "step": 1, "skip_steps": [5]})
    snapshot["rng/0"] = pickle.dumps(torch.get_rng_state())
    store = CheckpointStore(tmp_path / "ckpt")
    partial = store.new_partial(1)
    with single_process_quietly():
        dcp.save(snapshot, checkpoint_id=str(partial), no_dist=True)
    info = store.publish(partial, 1, {"model": {}})
    manifest = json.loads((info.path / "manifest.json").read_text())
    del manifest["format"]
    for entry in manifest["files"].values():
        del entry["rank"]
    (info.path / "manifest.json").write_text(json.dumps(manifest))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(1)  # move the weights away, then load them back
    extra = Checkpointer(store, 0, 1, "run").load(trainer, info.path)
    assert extra["step"] == 1 and trainer.cfg.data.skip_steps == [5]
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())

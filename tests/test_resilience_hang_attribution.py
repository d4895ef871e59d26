"""Hang attribution: a `hang` fault on one rank of each role (dp, tp, pp, cp) under real gloo
processes; the `hang` event names the rank behind, the group, the collective and its sequence
number, and RUN_DIR/hang-report.txt says it in words next to the stacks. The comparison itself is
checked on hand-made counters (a rank behind in one group because it waits in another)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.words_corpus import make_dataset
from engine.resilience.hang_report import attribute

ROOT = Path(__file__).resolve().parent.parent
HANG_TIMEOUT_S = 3.0  # steps of this model take ~0.03 s; start-up is before the first beat
TRAIN = ["train.steps=5", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "checkpoint.interval=0", "logging.tensorboard=false",
         "resilience.max_restarts=0", f"resilience.hang_timeout_s={HANG_TIMEOUT_S}"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def hang_run(dataset, run_dir: Path, *settings: str) -> list[dict]:
    apogee = [shutil.which("apogee")] if shutil.which("apogee") else [sys.executable, "-m", "cli.main"]
    cmd = apogee + ["pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set", *TRAIN,
                    f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert result.returncode == 18, f"exit status {result.returncode}\n{result.stderr[-4000:]}"
    records = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in records if e["type"] == "hang"]


@pytest.mark.distributed
@pytest.mark.parametrize("role, layout, rank, kinds", [
    ("dp", "parallel.dp=2", 1, {"all_reduce"}),
    ("tp", "parallel.tp=2", 0, {"all_reduce", "all_gather", "reduce_scatter"}),
    ("pp", "parallel.pp=2", 1, {"recv", "send"}),
    ("cp", "parallel.cp=2", 0, {"recv", "send", "all_gather"}),
])
def test_a_hung_rank_of_each_role_is_named_with_its_group_collective_and_sequence(dataset, tmp_path, role, layout,
                                                                                 rank, kinds):
    run_dir = tmp_path / "run"
    hangs = hang_run(dataset, run_dir, layout, f"resilience.inject=[hang:rank={rank}:step=3]")
    assert hangs  # the first watchdog to fire records it; the launcher may stop the other first
    for hang in hangs:
        assert hang["behind"] == [rank], hang
        assert hang["group"] == role and hang["group_ranks"] == [0, 1], hang
        assert hang["collective"] in kinds and hang["seq"] >= 1, hang
        assert hang["step"] == 3 and hang["exit_code"] == 18
    seqs = {(h["group"], h["collective"], h["seq"]) for h in hangs}
    assert len(seqs) == 1  # both ranks' watchdogs, reading the same counters, agree
    report = (run_dir / "hang-report.txt").read_text()
    (hang,) = hangs[:1]
    assert f"rank {rank} has not entered {hang['collective']} #{hang['seq']}" in report
    assert f"of the {role} group [0, 1]" in report and f"hang-rank{hang['rank']}.txt" in report
    stacks = (run_dir / f"hang-rank{hang['rank']}.txt").read_text()  # the recording rank's own stacks
    if hang["rank"] == rank:  # the hung rank's watchdog fired first (else the launcher may stop it before)
        assert "hang_forever" in stacks


def _record(groups: dict, steps: int = 2) -> dict:
    return {"steps_completed": steps, "p2p": {},
            "groups": {name: {"members": members, "seq": seq, "recent": [[seq, op, op]]}
                       for name, (members, seq, op) in groups.items()}}


def test_the_root_is_the_rank_behind_that_waits_nowhere():
    # dp2 x tp2: rank 1 (tp peer of 0) hangs. Rank 0 waits in tp all_reduce #8; ranks 2, 3 ran their
    # step and wait in dp all_reduce #5 for ranks 0 and 1, which have not entered it.
    ranks = {0: _record({"tp": ([0, 1], 8, "all_reduce"), "dp": ([0, 2], 4, "all_reduce")}),
             1: _record({"tp": ([0, 1], 7, "all_reduce"), "dp": ([1, 3], 4, "all_reduce")}),
             2: _record({"tp": ([2, 3], 12, "all_reduce"), "dp": ([0, 2], 5, "all_reduce")}),
             3: _record({"tp": ([2, 3], 12, "all_reduce"), "dp": ([1, 3], 5, "all_reduce")})}
    result = attribute(ranks, world_size=4)
    assert result["behind"] == [1]
    # Rank 1 is behind in both of its groups; rank 0 is behind in dp only because it waits in tp.
    assert (result["group"], result["group_ranks"], result["seq"]) in [("dp", [1, 3], 5), ("tp", [0, 1], 8)]
    assert "rank 1 has not entered all_reduce #8 of the tp group [0, 1]; rank 0 waits in it" in result["attribution"]
    assert "rank 1 has not entered all_reduce #5 of the dp group [1, 3]; rank 3 waits in it" in result["attribution"]
    assert "of the dp group [0, 2]" not in result["attribution"]
    assert len(result["findings"]) == 3 and result["unreported_ranks"] == []


def test_a_rank_without_a_record_is_said_and_agreeing_counters_name_no_one():
    ranks = {0: _record({"dp": ([0, 1], 4, "all_reduce")}), 1: _record({"dp": ([0, 1], 4, "all_reduce")})}
    result = attribute(ranks, world_size=3)
    assert result["behind"] == [] and result["group"] is None
    assert "no progress record from rank 2" in result["attribution"]

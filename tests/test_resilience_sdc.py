"""Silent data corruption, loss spikes and bad batches, rehearsed through `resilience.inject` on
`apogee pretrain --nproc 2` (two data-parallel replicas): each fault is detected, attributed to the
rank that suffered it, and rewound; the run then finishes on the clean run's curve (bitwise, since
a step is a pure function of its inputs), or, for a bad batch, skips it and completes.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.state.export import load_model
from data_pipeline.words_corpus import make_dataset

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24
TRAIN = [f"train.steps={STEPS}", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "checkpoint.interval=6", "logging.tensorboard=false",
         "resilience.spike_window=5", "resilience.check_interval=4", "resilience.max_restarts=0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def pretrain(dataset, run_dir: Path, *settings: str, status: int = 0) -> subprocess.CompletedProcess:
    apogee = [shutil.which("apogee")] if shutil.which("apogee") else [sys.executable, "-m", "cli.main"]
    cmd = apogee + ["pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set", *TRAIN,
                    f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == status, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def events(run_dir: Path, *kinds: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["type"] in kinds]


def final_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the accepted (last logged) run of each step."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def assert_on_the_clean_curve(run_dir: Path, clean: Path) -> None:
    assert final_losses(run_dir) == final_losses(clean)  # bitwise
    ours = load_model(run_dir / "checkpoints" / f"step_{STEPS:08d}").state_dict()
    theirs = load_model(clean / "checkpoints" / f"step_{STEPS:08d}").state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


@pytest.fixture(scope="module")
def clean_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    pretrain(dataset, run_dir)
    return run_dir


@pytest.mark.distributed
def test_no_false_positive_over_a_clean_run_of_200_steps(dataset, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "train.steps=200", "checkpoint.interval=50", "resilience.spike_window=20",
             "resilience.check_interval=10")
    assert len(final_losses(run_dir)) == 200
    assert events(run_dir, "sdc_suspect", "sdc_confirmed", "rewind", "skip", "stopped") == []


@pytest.mark.distributed
def test_exponent_flip_in_one_replicas_gradient_is_attributed_rewound_and_the_curve_is_clean(
        dataset, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "resilience.inject=[bitflip:target=grad:rank=1:step=15:bit=30]")
    suspect, = events(run_dir, "sdc_suspect")
    assert suspect["step"] == 15  # detected at the step itself, well within the check interval
    confirmed, = events(run_dir, "sdc_confirmed")
    assert confirmed["faulty_rank"] == 1 and confirmed["step"] == 15 and "gradient" in confirmed["evidence"]
    rewind, = events(run_dir, "rewind")
    assert rewind["step"] == 12 and rewind["skipped_batch"] is None
    assert_on_the_clean_curve(run_dir, clean_run)


MOE_EP2 = ("model.num_experts=4", "model.moe_topk=2", "parallel.ep=2")


@pytest.fixture(scope="module")
def clean_moe_run(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean-moe") / "run"
    pretrain(dataset, run_dir, *MOE_EP2)
    return run_dir


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["dense", "moe_ep2"])
def test_a_flipped_parameter_makes_replicas_disagree_and_the_replay_names_its_rank(dataset, layout, tmp_path,
                                                                                    request):
    """Under expert parallelism the ranks hold different experts: the dense weights are still
    compared among their replicas, and a flip in one of them is caught the same way."""
    settings = MOE_EP2 if layout == "moe_ep2" else ()
    clean_run = request.getfixturevalue("clean_moe_run" if settings else "clean_run")
    run_dir = tmp_path / "run"
    # element 6464: row 101 ('e') of the [vocab, 64] embedding, a token every batch uses
    pretrain(dataset, run_dir, *settings, "resilience.inject=[bitflip:target=param:rank=0:step=13:bit=22:element=6464]")
    suspect, = events(run_dir, "sdc_suspect")
    assert suspect["step"] == 16 and "replicas [0, 1] disagree" in suspect["reason"]  # the next check
    confirmed = events(run_dir, "sdc_confirmed")
    assert {c["step"] for c in confirmed} == {14}  # the first step that used it
    if settings:
        # Under EP rank 1's experts computed rank 0's (corrupted) tokens: its local expert gradients
        # changed on replay too, so the replay names it as well (over-inclusive, never missing).
        assert 0 in {c["faulty_rank"] for c in confirmed}
    else:
        assert [c["faulty_rank"] for c in confirmed] == [0]
    assert_on_the_clean_curve(run_dir, clean_run)


@pytest.mark.distributed
def test_a_corrupted_activation_is_caught_by_the_periodic_audit(dataset, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "resilience.audit_interval=5",
             "resilience.inject=[bitflip:target=activation:rank=1:step=10:bit=30]")
    confirmed, = events(run_dir, "sdc_confirmed")
    assert confirmed["faulty_rank"] == 1 and confirmed["step"] == 10 and "audit" in confirmed["evidence"]
    assert len(final_losses(run_dir)) == STEPS


@pytest.mark.distributed
def test_a_garbage_batch_is_reproduced_then_skipped_and_the_run_completes(dataset, clean_run, tmp_path):
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "resilience.inject=[garbage_batch:step=17]")
    assert [e["step"] for e in events(run_dir, "sdc_suspect")] == [17]
    assert events(run_dir, "sdc_confirmed") == []  # every rank reproduced it: no rank is blamed
    skip, = events(run_dir, "skip")
    assert skip["step"] == 17 and skip["data_batch"] == 16
    rewinds = events(run_dir, "rewind")
    assert [r["step"] for r in rewinds] == [12, 12] and rewinds[-1]["skipped_batch"] == 16
    losses, clean = final_losses(run_dir), final_losses(clean_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, 17)] == [clean[s] for s in range(1, 17)]
    assert losses[17] == pytest.approx(clean[18], rel=0.2)  # step 17 trained on batch 17 instead


@pytest.mark.distributed
def test_too_many_rewinds_stop_the_run_with_status_17_and_a_clear_message(dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = pretrain(dataset, run_dir, "resilience.max_rewinds=1",
                      "resilience.inject=[garbage_batch:step=17]", status=17)
    assert "rewinds within 100 steps (resilience.max_rewinds=1)" in result.stderr
    stopped, = events(run_dir, "stopped")
    assert "max_rewinds" in stopped["reason"]


@pytest.mark.distributed
def test_a_replay_that_diverges_on_every_rank_accuses_nobody_and_skips_the_batch(dataset, clean_run, tmp_path):
    """replay_noise makes every rank's first local result differ on each replay of step 15, as
    nondeterministic kernels would: the flip that caused the spike can no longer be told from them."""
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "resilience.inject=[bitflip:target=grad:rank=1:step=15:bit=30,replay_noise:step=15]")
    assert [e["step"] for e in events(run_dir, "sdc_suspect")] == [15]
    verdict, = events(run_dir, "replay_nondeterministic")
    assert verdict["step"] == 15 and verdict["suspect_step"] == 15 and verdict["ranks"] == [0, 1]
    assert events(run_dir, "sdc_confirmed") == []  # no rank named
    rewinds = events(run_dir, "rewind")
    assert [r["step"] for r in rewinds] == [12, 12] and rewinds[-1]["skipped_batch"] == 14
    assert "not deterministic" in rewinds[-1]["reason"]
    skip, = events(run_dir, "skip")
    assert skip["step"] == 15 and skip["data_batch"] == 14
    losses, clean = final_losses(run_dir), final_losses(clean_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, 15)] == [clean[s] for s in range(1, 15)]


@pytest.mark.distributed
def test_an_sdc_on_one_tensor_parallel_rank_is_named_though_every_ranks_replay_differs(dataset, tmp_path):
    """At tp=2 rank 1's corrupted activation reaches rank 0 through the next all-reduce, so both
    ranks' loss and gradients differ in the audit; only rank 1 diverged before a collective."""
    run_dir = tmp_path / "run"
    pretrain(dataset, run_dir, "parallel.tp=2", "resilience.audit_interval=5",
             "resilience.inject=[bitflip:target=activation:rank=1:step=10:bit=30]")
    confirmed, = events(run_dir, "sdc_confirmed")
    assert confirmed["faulty_rank"] == 1 and confirmed["step"] == 10 and "audit" in confirmed["evidence"]
    assert "ranks [0] diverged only after it" in confirmed["evidence"]
    assert events(run_dir, "replay_nondeterministic") == []
    assert len(final_losses(run_dir)) == STEPS

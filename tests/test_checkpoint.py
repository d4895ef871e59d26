"""Checkpoints: bitwise resume, resharding across layouts, export, and refusing what must not load."""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.parity import FakeData, parity_config

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Stands in for a crash right after a step."""


def _segment(rank, world_size, overrides, steps, run_dir, stop_after=None):
    """Train (resuming from run_dir's checkpoints if any) until `stop_after` steps or the end.

    Returns ({step: loss} of the steps run here, full state dict at the end (rank 0), resumed-from step).
    """
    from engine.state.checkpoint import Checkpointer
    from engine.model.parallelize import gather_full_state_dict
    from engine.state.resume import checkpoint_store, run_id
    from engine.job.resume_rank import resume_trainer
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = parity_config(overrides, world_size, steps)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext.create(cfg.parallel)
    run_dir = Path(run_dir)
    trainer = Trainer(cfg, ctx, FakeData.for_config(cfg), run_dir=run_dir)
    checkpointer = Checkpointer(checkpoint_store(cfg, run_dir), ctx.rank, ctx.world_size, run_id(run_dir),
                                on_event=trainer.events.record)
    start = resume_trainer(trainer, checkpointer, cfg, "auto", run_dir)
    losses = {}

    def on_step(result):
        losses[result.step] = result.loss
        if stop_after is not None and result.step + 1 == stop_after:
            raise Interrupted()

    try:
        trainer.fit(start, checkpointer, on_step=on_step)
    except Interrupted:
        checkpointer.wait()
    with getattr(trainer.grads, "gathered", contextlib.nullcontext)():  # ZeRO-3 holds only pieces
        state = gather_full_state_dict(trainer.chunks, ctx)
    return losses, ({k: v.float().numpy() for k, v in state.items()} if ctx.rank == 0 else None), start  # bf16 -> fp32 exactly


def _run(world_size, *args):
    if world_size == 1:
        return _segment(0, 1, *args)
    from tests.distributed import run_distributed
    return run_distributed(_segment, world_size, *args, timeout=300)[0]


def _new_run_dir(tmp_path, name):
    from engine.state.resume import run_id
    run_dir = tmp_path / name
    run_id(run_dir)  # created once here, so ranks only read it
    return run_dir


def test_interrupted_and_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    overrides = ["checkpoint.interval=2"]
    clean_losses, clean_state, _ = _run(1, overrides, 7, _new_run_dir(tmp_path, "clean"))
    run_dir = _new_run_dir(tmp_path, "crashy")
    first, _, _ = _run(1, overrides, 7, run_dir, 5)  # crash after step 5 (checkpoint of step 4 exists)
    second, state, resumed_from = _run(1, overrides, 7, run_dir)
    assert resumed_from == 4
    merged = {**first, **second}  # steps 4 (index) onward were re-run after the resume
    assert [merged[s] for s in range(7)] == [clean_losses[s] for s in range(7)]
    assert second[4] == first[4]
    for name, value in clean_state.items():
        assert (state[name] == value).all(), name
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    saved = [e for e in events if e["type"] == "checkpoint_saved"]
    assert [e["step"] for e in saved] == [2, 4, 6, 7] and all(e["pause_s"] > 0 for e in saved)
    assert any(e["type"] == "resume" and e["step"] == 4 for e in events)


@pytest.mark.distributed
def test_resume_at_tp2_dp2_is_bitwise_identical(tmp_path):
    steps, layout = 6, ["parallel.tp=2", "checkpoint.interval=3"]
    run_dir = _new_run_dir(tmp_path, "a")
    _run(4, layout, steps, run_dir, 4)                         # tp=2 x dp=2, crash after step 4
    clean, clean_state, _ = _run(4, layout, steps, _new_run_dir(tmp_path, "a-clean"))
    resumed, state, start = _run(4, layout, steps, run_dir)   # same layout: bitwise
    assert start == 3 and [resumed[s] for s in range(3, steps)] == [clean[s] for s in range(3, steps)]
    assert all((state[k] == v).all() for k, v in clean_state.items())


def _copy_checkpoint(source_run: Path, target: Path, step: int) -> None:
    (target / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    subprocess.run(["cp", "-r", str(source_run / "checkpoints" / name), str(target / "checkpoints")], check=True)
    (target / "checkpoints" / "latest").write_text(name + "\n")
    (target / "run_id").write_text((source_run / "run_id").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("source_world, source_layout", [
    (4, ["parallel.tp=2", "parallel.pp=2"]),
    (2, ["parallel.zero=1"]),
    (2, ["parallel.zero=3"]),
], ids=["tp2xpp2", "zero1xdp2", "zero3xdp2"])
def test_a_checkpoint_reshards_to_dp4_and_to_one_rank_and_continues_on_the_reference_curve(
        tmp_path, single_rank, source_world, source_layout):
    # The uninterrupted single-rank run; the floor of the source layout (the targets split no microbatch).
    reference, tolerance = single_rank.reference([], 6), single_rank.tolerance([], 6, layout=source_layout)
    source = _new_run_dir(tmp_path, "source")
    saved, _, _ = _run(source_world, [*source_layout, "checkpoint.interval=3"], 6, source, 4)
    for world, layout in ((4, ["parallel.tp=1"]), (1, [])):
        target = tmp_path / f"target-{world}"
        _copy_checkpoint(source, target, 3)
        losses, state, start = _run(world, layout, 6, target)
        assert start == 3
        curve = [saved[s] for s in range(3)] + [losses[s] for s in range(3, 6)]
        tolerance.check(f"{source_layout} resumed on {world} rank(s)", curve,
                        {k: torch.from_numpy(v) for k, v in state.items()}, reference.losses, reference.state_dict)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline.words_corpus import make_dataset
    return make_dataset(tmp_path_factory.mktemp("corpus"))


def _pretrain(run_dir, dataset, *sets):
    small = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.steps=2", "checkpoint.interval=1", f"data.inputs=[{dataset}]",
             f"data.cache_dir={Path(run_dir).parent}/cache"]
    return _cli("pretrain", "--run-dir", str(run_dir), "--set", *small, *sets)


def test_resuming_with_another_model_names_the_differing_fields(tmp_path, dataset):
    assert _pretrain(tmp_path / "run", dataset).returncode == 0
    result = _pretrain(tmp_path / "run", dataset, "model.hidden_size=32", "model.ffn_hidden_size=96")
    assert result.returncode == 2
    assert "model.hidden_size: checkpoint 64, config 32" in result.stderr
    assert "model.ffn_hidden_size: checkpoint 352, config 96" in result.stderr


def test_a_checkpoint_of_another_run_is_refused_unless_allowed(tmp_path, dataset):
    assert _pretrain(tmp_path / "base", dataset).returncode == 0
    other = str(tmp_path / "base" / "checkpoints" / "step_00000002")
    refused = _pretrain(tmp_path / "branch", dataset, "train.steps=3", "--resume", other)
    assert refused.returncode == 2 and "set checkpoint.allow_other_run=true" in refused.stderr
    allowed = _pretrain(tmp_path / "branch", dataset, "train.steps=3", "checkpoint.allow_other_run=true",
                        "--resume", other)
    assert allowed.returncode == 0, allowed.stderr
    assert "resumed from" in allowed.stdout


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, dataset):
    run = tmp_path / "run"
    assert _pretrain(run, dataset).returncode == 0
    newest = run / "checkpoints" / "step_00000002"
    data_file = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:-7] + b"garbage")
    result = _pretrain(run, dataset, "train.steps=3")
    assert result.returncode == 0, result.stderr
    assert "step_00000002 is not usable" in result.stdout and "does not match its checksum" in result.stdout
    assert "resumed from" in result.stdout and "step_00000001 (step 1)" in result.stdout


def test_export_to_hugging_face_gives_the_same_logits(tmp_path, dataset):
    from transformers import LlamaForCausalLM

    from engine.state.export import load_model
    run = tmp_path / "run"
    assert _pretrain(run, dataset).returncode == 0
    checkpoint = run / "checkpoints" / "step_00000002"
    result = _cli("export", "--checkpoint", str(checkpoint), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    ours = load_model(checkpoint).eval()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-5


def _forget_padding_field(run_dir):
    """Make every checkpoint of `run_dir` look written before model.make_vocab_size_divisible_by existed."""
    for manifest in (Path(run_dir) / "checkpoints").glob("step_*/manifest.json"):
        data = json.loads(manifest.read_text())
        del data["metadata"]["model"]["make_vocab_size_divisible_by"]
        manifest.write_text(json.dumps(data))


def test_a_checkpoint_written_before_vocabulary_padding_still_resumes(tmp_path, dataset):
    """A manifest without model.make_vocab_size_divisible_by holds an unpadded model: at vocab 384
    (3 x 128) that is today's model under the default 128, so it resumes; an unpadded vocab 300
    (300 rows, 384 by today's default) is refused naming the key and the value that continues it."""
    run = tmp_path / "run"
    assert _pretrain(run, dataset, "model.make_vocab_size_divisible_by=1").returncode == 0
    _forget_padding_field(run)
    resumed = _pretrain(run, dataset, "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    odd = tmp_path / "odd"
    assert _pretrain(odd, dataset, "model.vocab_size=300", "model.make_vocab_size_divisible_by=1").returncode == 0
    _forget_padding_field(odd)
    refused = _pretrain(odd, dataset, "model.vocab_size=300", "train.steps=3")
    assert refused.returncode == 2
    assert "set model.make_vocab_size_divisible_by=1 to continue it" in refused.stderr, refused.stderr
    assert _pretrain(odd, dataset, "model.vocab_size=300", "model.make_vocab_size_divisible_by=1",
                     "train.steps=3").returncode == 0

"""Training with every fp8 recipe: the curve follows bf16's, every layout (dp2, tp2, pp2) follows the
single-rank run, a resumed run continues bit for bit (pp2 included: the recipe state is saved per
layer, layout-free), and `apogee pretrain` with blockwise and mxfp8 trains on two ranks, catches a
flipped gradient bit and rewinds onto the clean curve like bf16.

The model's widths tile 128-blocks at tp=2 (hidden 256, 4 heads and 4 kv heads of 64, ffn 512;
64 tokens x 2 samples = 128 rows per GEMM), so blockwise and mxfp8 scale the same blocks in every
layout. Tolerances come from a noise floor measured in the same run and printed:
- delayed, blockwise, mxfp8 (and tensorwise at dp2/pp2) see the very scales of the single-rank run
  (delayed: amaxes reduced over tp x cp x dp; blocks: local; tensorwise: each microbatch's own
  tensors); a layout only changes the order of fp32 sums (TP splits a contraction, DP sums
  gradients over ranks), which moves a few values across fp8 rounding boundaries. The floor is the
  same kind of perturbation on one rank: the same global batch in one microbatch of 4 instead of
  two of 2 (other GEMM shapes and accumulation order, the same blocks and scales). Layouts must
  stay within noise_floor.FACTOR (4) times that floor, the rule every parity test keeps
  (tests/noise_floor.py says why 4: a low draw of the floor times a high draw of the layout;
  measured here, tp2 lands at up to 2.2x its floor, a real layout bug thousands of times over).
- every recipe at tp2: TP splits the GEMMs' contractions, which the microbatch floor never
  reorders, and values cross fp8 rounding boundaries: the floor is the larger of the
  accumulation floor and the grid floor below (measured: delayed tp2 at 4.9x the accumulation
  floor after the sharded-init weights, inside the grid floor's tolerance).
- tensorwise at tp2: each weight shard, and each column-parallel gradient and row-parallel input
  shard, gets its own per-tensor scale (Transformer Engine reduces amaxes only over tensors it
  gathers), so the rounding grid of those tensors moves. Its floor is the same grid move on one
  rank: tensorwise with power-of-two scales (every scale moved by a factor in (1/2, 1]).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from engine.model.fp8.recipes import RECIPES
from tests.noise_floor import FACTOR
from tests.parity import max_relative_loss_diff, train_layouts

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
ALIGNED = ["model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_heads=4", "model.num_kv_heads=4",
           "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4"]
LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


def fp8(recipe, *extra):
    return [*ALIGNED, "precision.dtype=fp8", f"precision.fp8_recipe={recipe}", *extra]


@pytest.fixture(scope="module")
def single_rank():
    """{name: losses} of the one-rank runs: each recipe, bf16, and the noise-floor variants."""
    runs = {"bf16": [*ALIGNED, "precision.dtype=bf16"],
            **{recipe: fp8(recipe) for recipe in RECIPES},
            **{f"{recipe} mbs4": fp8(recipe, "train.micro_batch_size=4") for recipe in RECIPES},
            "tensorwise power_2": fp8("tensorwise", "precision.fp8_power_2_scales=true")}
    return {name: run.losses for name, run in zip(runs, train_layouts(list(runs.values()), 1, STEPS))}


def test_every_recipe_trains_and_follows_the_bf16_curve(single_rank):
    bf16 = single_rank["bf16"]
    for recipe in RECIPES:
        losses = single_rank[recipe]
        diff = max_relative_loss_diff(losses[1:], bf16[1:])
        print(f"{recipe}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, max relative diff from bf16 {diff:.2e}")
        assert losses[-1] < losses[0] - 0.3
        # Step 0 of delayed scaling runs at the initial scale 1 (its small gradients underflow, as
        # with TE); from then on every recipe stays within a few percent of bf16.
        assert diff < 0.05


def _tolerance(single_rank, recipe, layout):
    accumulation = max_relative_loss_diff(single_rank[f"{recipe} mbs4"], single_rank[recipe])
    if layout != "tp2":
        return accumulation, "accumulation order: one microbatch of 4 instead of two of 2"
    # TP splits the GEMMs' contractions (row-parallel partial sums, then an all-reduce), which the
    # microbatch floor never reorders; values then land on the other side of fp8 rounding
    # boundaries, a move of the quantisation grid, whose measured stand-in is the power-of-two
    # grid move (tensorwise at tp2 also gets per-shard scales: that same move).
    grid = max_relative_loss_diff(single_rank["tensorwise power_2"], single_rank["tensorwise"])
    return max(accumulation, grid), "split contractions: the larger of the accumulation and fp8-grid floors"


@pytest.mark.distributed
def test_every_recipe_in_every_layout_follows_its_single_rank_run(single_rank):
    names = [(recipe, layout) for recipe in RECIPES for layout in LAYOUTS]
    runs = train_layouts([fp8(recipe, *LAYOUTS[layout]) for recipe, layout in names], 2, STEPS, timeout=1800)
    failures = []
    for (recipe, layout), run in zip(names, runs):
        diff = max_relative_loss_diff(run.losses, single_rank[recipe])
        floor, kind = _tolerance(single_rank, recipe, layout)
        print(f"{recipe} {layout}: max relative loss diff {diff:.2e}; noise floor {floor:.2e} ({kind}); "
              f"tolerance {FACTOR * floor:.2e}")
        if not diff <= FACTOR * floor:
            failures.append((recipe, layout, diff, floor))
    assert failures == []


def _resume(world, overrides, tmp_path, crash_after=5, steps=7):
    from tests.test_checkpoint import _new_run_dir, _run

    overrides = [*overrides, "checkpoint.interval=3"]
    clean, clean_state, _ = _run(world, overrides, steps, _new_run_dir(tmp_path, "clean"))
    run_dir = _new_run_dir(tmp_path, "crashy")
    _run(world, overrides, steps, run_dir, crash_after)  # crash after step 5: resumes from step 3
    resumed, state, start = _run(world, overrides, steps, run_dir)
    assert start == 3
    assert [resumed[s] for s in range(3, steps)] == [clean[s] for s in range(3, steps)]
    assert all((state[k] == v).all() for k, v in clean_state.items())
    return run_dir


@pytest.mark.parametrize("recipe", ["delayed", "blockwise", "mxfp8"])
def test_a_resumed_fp8_run_is_bitwise_identical(recipe, tmp_path):
    """The recipe's state (delayed scaling's amax history and scales) travels in the checkpoint; the
    block recipes keep none (tensorwise neither: its resume is blockwise's, minus the blocks)."""
    run_dir = _resume(1, fp8(recipe), tmp_path)
    keys = FileSystemReader(str(run_dir / "checkpoints" / "step_00000006")).read_metadata().state_dict_metadata
    fp8_keys = sorted(k for k in keys if k.startswith("fp8/"))
    if recipe == "delayed":
        assert len(fp8_keys) == 2 * 7 * 2 and "fp8/layers.1.mlp.down_proj/amax_history" in fp8_keys
    else:
        assert fp8_keys == []  # current and block scaling keep no state


@pytest.mark.distributed
def test_a_delayed_scaling_run_resumes_bitwise_at_pp2_with_every_stage_s_scales(tmp_path):
    run_dir = _resume(2, fp8("delayed", "parallel.pp=2"), tmp_path)
    keys = FileSystemReader(str(run_dir / "checkpoints" / "step_00000006")).read_metadata().state_dict_metadata
    assert {"fp8/layers.0.self_attn.q_proj/scale", "fp8/layers.1.self_attn.q_proj/scale"} <= set(keys)


# ------------------------------------------------------------------ the command, two ranks, SDC

CLI_STEPS = 12
CLI_TRAIN = [f"train.steps={CLI_STEPS}", "model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=4",
             "model.ffn_hidden_size=384", "model.seq_length=64", "train.global_batch_size=4",
             "train.micro_batch_size=2", "checkpoint.interval=4", "logging.tensorboard=false",
             "resilience.spike_window=5", "resilience.check_interval=4", "resilience.max_restarts=0",
             "precision.dtype=fp8"]
"""A tiny model whose widths tile 128-blocks, on two data-parallel ranks (the SDC tests' pattern)."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipeline.words_corpus import make_dataset

    return make_dataset(tmp_path_factory.mktemp("corpus"))


def _pretrain(dataset, run_dir, *settings):
    apogee = [shutil.which("apogee")] if shutil.which("apogee") else [sys.executable, "-m", "cli.main"]
    cmd = apogee + ["pretrain", "--nproc", "2", "--run-dir", str(run_dir), "--set", *CLI_TRAIN,
                    f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}", *settings]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8"])
def test_pretrain_with_a_block_recipe_trains_on_two_ranks_and_rewinds_a_flipped_gradient_onto_its_curve(
        recipe, dataset, tmp_path):
    from tests.test_resilience_sdc import events, final_losses

    clean = tmp_path / "clean"
    out = _pretrain(dataset, clean, f"precision.fp8_recipe={recipe}").stdout
    assert f"fp8 recipe {recipe} (e4m3) runs through the PyTorch emulation" in out
    losses = final_losses(clean)
    print(f"{recipe}: loss {losses[1]:.4f} -> {losses[CLI_STEPS]:.4f}")
    assert len(losses) == CLI_STEPS and losses[CLI_STEPS] < losses[1] - 0.5
    faulty = tmp_path / "faulty"
    _pretrain(dataset, faulty, f"precision.fp8_recipe={recipe}",
              "resilience.inject=[bitflip:target=grad:rank=1:step=9:bit=30]")
    confirmed, = events(faulty, "sdc_confirmed")
    assert confirmed["faulty_rank"] == 1 and confirmed["step"] == 9 and "gradient" in confirmed["evidence"]
    rewind, = events(faulty, "rewind")
    assert rewind["step"] == 8
    assert final_losses(faulty) == losses  # bitwise: the rewound run is the clean run
    final = f"step_{CLI_STEPS:08d}"
    from engine.state.export import load_model

    ours, theirs = (load_model(run / "checkpoints" / final).state_dict() for run in (faulty, clean))
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())

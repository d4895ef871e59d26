"""Mixture-of-experts layouts reproduce the single-rank run; expert parallelism moves exactly its tokens.

Parity: a 4-expert top-2 model with the balance loss on, ten fp32 steps; per-step loss (relative)
and final gathered weights (max abs) within the measured tolerance (tests/noise_floor.py) of the
single-rank run, for dp2, ep2,
ep2 x cp2, pp2 (world 2) and ep4, ep2 with expert-dp 2 (dp4), pp2 x ep2 (world 4).

Traffic: the dense weights reduce over the data-parallel group and the expert weights over
expert-dp; the tokens an EP rank sends in the dispatch come back in the combine, so the two
all-to-alls book the same bytes (forward rows plus their gradients in backward).
"""
import pytest
import torch

from tests.parity import assert_matches_reference, train_named_layouts

STEPS = 10
MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_aux_loss_coeff=0.01"]
SPAWNS = {
    2: {
        "dp2": [*MOE, "parallel.dp=2"],
        "ep2": [*MOE, "parallel.ep=2"],
        "cp2_ep2": [*MOE, "parallel.cp=2", "parallel.ep=2"],
        "pp2": [*MOE, "parallel.pp=2"],
    },
    4: {
        "ep4": [*MOE, "parallel.ep=4"],
        "ep2_dp4": [*MOE, "parallel.ep=2", "parallel.grad_bucket_mb=0.1"],
        "pp2_ep2": [*MOE, "parallel.pp=2", "parallel.ep=2"],
    },
}
LAYOUTS = {name: overrides for layouts in SPAWNS.values() for name, overrides in layouts.items()}

# Parameter counts of the parity model (hidden 64, 2 layers, ffn 128, vocab 128, 8 heads / 4 kv).
DENSE = 128 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 2 * 64 + 64 * 4) + 64
EXPERTS = 2 * 4 * 3 * 64 * 128


@pytest.fixture(scope="module")
def reference(single_rank):
    return single_rank.reference(MOE, STEPS)




@pytest.fixture(scope="module")
def runs():
    return train_named_layouts(SPAWNS, STEPS)


def test_reference_learns_and_routes_to_every_expert(reference):
    assert reference.losses[-1] < reference.losses[0] - 0.5
    assert set(reference.state_dict) >= {"layers.0.mlp.router.weight", "layers.1.mlp.gate_proj.weight"}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank_loss_and_weights(layout, runs, reference, single_rank):
    tolerance = single_rank.tolerance(MOE, STEPS, layout=LAYOUTS[layout])
    assert_matches_reference(layout, runs[layout], reference, tolerance)


@pytest.mark.distributed
def test_dense_weights_reduce_over_dp_and_experts_over_expert_dp(runs):
    assert runs["dp2"].ledgers[0][("dp", "all_reduce")] == 4 * (DENSE + EXPERTS)
    # ep2 on two ranks: every rank holds other experts (expert-dp of one), the dense part reduces.
    assert runs["ep2"].ledgers[0][("dp", "all_reduce")] == 4 * DENSE
    assert not any(group == "expert-dp" for group, _ in runs["ep2"].ledgers[0])
    # ep2 on four ranks: two copies of each half of the experts, summed over expert-dp.
    ledger = runs["ep2_dp4"].ledgers[0]
    assert ledger[("dp", "all_reduce")] == 4 * DENSE
    assert ledger[("expert-dp", "all_reduce")] == 4 * EXPERTS // 2


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["ep2", "cp2_ep2", "ep4", "pp2_ep2"])
def test_dispatch_and_combine_move_the_same_bytes(layout, runs):
    for ledger in runs[layout].ledgers:
        dispatch = ledger[("ep", "ep_dispatch")]
        assert dispatch > 0 and dispatch == ledger[("ep", "ep_combine")]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["ep2", "ep4"])
def test_balance_loss_counts_are_exchanged_once_per_moe_layer_and_microbatch(layout, runs):
    run = runs[layout]
    ep = int(layout[2:])
    # Per MoE layer and microbatch: E int64 counts, of which (ep - 1) / ep go to other ranks.
    per_call = 8 * 4 * (ep - 1) // ep
    assert run.ledgers[0][("ep", "ep_counts")] == per_call * 2 * run.num_microbatches


@pytest.mark.distributed
def test_an_ep2_checkpoint_resumes_on_one_rank_and_on_ep4(tmp_path, single_rank):
    from tests.test_checkpoint import _copy_checkpoint, _new_run_dir, _run

    reference, tolerance = single_rank.reference(MOE, 6), single_rank.tolerance(MOE, 6, layout=["parallel.ep=2"])
    source = _new_run_dir(tmp_path, "source")
    saved, _, _ = _run(2, [*MOE, "parallel.ep=2", "checkpoint.interval=3"], 6, source, 4)
    for world, layout in ((1, []), (4, ["parallel.ep=4"])):
        target = tmp_path / f"target-{world}"
        _copy_checkpoint(source, target, 3)
        losses, state, start = _run(world, [*MOE, *layout], 6, target)
        assert start == 3
        curve = [saved[s] for s in range(3)] + [losses[s] for s in range(3, 6)]
        tolerance.check(f"ep2 resumed on {layout or 'one rank'}", curve, {k: torch.from_numpy(v) for k, v in state.items()},
                        reference.losses, reference.state_dict)

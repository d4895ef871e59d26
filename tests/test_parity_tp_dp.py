"""Tensor, sequence and data parallelism reproduce the single-rank run, moving exactly the bytes the formulas say.

Parity: every layout's per-step loss (relative) and its final gathered weights (max abs) within
the measured tolerance of the single-rank run (tests/noise_floor.py: FACTOR x the difference the
same run shows with its reductions reordered), over ten fp32 steps of the tiny parity model. Two
deliberately broken layouts (tests/layout_bugs.py), trained in the same 2-rank spawn, show that
this tolerance still fails a real bug: one of 21 gradient buckets left unreduced (64 norm weights
of 90k parameters), and a TP rank holding another rank's shard of one weight.

Traffic, per step, m microbatches per DP rank of b samples, s tokens, hidden h, L layers, fp32
(E = b*s*h*4 bytes, the payload of one [b, s, h] activation; full-tensor bytes for gathers and
reduce-scatters):
- TP (Shoeybi et al.): tp/all_reduce = (4L + 2) * E * m: per layer two all-reduces forward (g after
  o_proj and down_proj) and two backward (f before attention and MLP), plus the embedding's g
  forward and the head input's f backward;
- TP + SP (Korthikanti et al.): tp/all_gather = tp/reduce_scatter = (4L + 2) * E * m, the same
  places with each all-reduce split into its reduce-scatter/all-gather pair; and once per step
  tp/sequence_parallel_grads = (2L + 1) * h * 4 (the norm weights' partial gradients);
- vocab-parallel cross-entropy: tp/cross_entropy = 3 * b * s * 4 * m (max, sum-exp, target logit);
- DP: dp/all_reduce = the gradient buffer's bytes, once per step whatever m is, in as many calls
  as there are buckets;
- bookkeeping, also counted exactly: dp/metrics = 4 (the loss sum) when dp > 1, tp-pp/grad_norm = 4
  when tp > 1.
"""
import pytest

from tests import layout_bugs
from tests.parity import assert_matches_reference, max_weight_diff, parity_config, train_named_layouts

STEPS = 10
SMALL_BUCKETS = "parallel.grad_bucket_mb=0.1"  # several DP buckets for the tiny model
TWO_RANK_LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "dp2": ["parallel.dp=2", SMALL_BUCKETS],
}
FOUR_RANK_LAYOUTS = {
    "tp4": ["parallel.tp=4"],
    "dp4": ["parallel.dp=4", SMALL_BUCKETS],
    "tp2_dp2": ["parallel.tp=2", "parallel.dp=2", SMALL_BUCKETS],
}
LAYOUTS = {**{k: (v, 2) for k, v in TWO_RANK_LAYOUTS.items()}, **{k: (v, 4) for k, v in FOUR_RANK_LAYOUTS.items()}}
# Broken on purpose, in the 2-rank spawn: (overrides, bug). Buckets of one parameter each (21).
BUGGED = {
    "dp2_one_bucket_unreduced": (["parallel.dp=2", "parallel.grad_bucket_mb=0.0001"],
                                 layout_bugs.one_gradient_bucket_not_reduced),
    "tp2_wrong_shard": (["parallel.tp=2"], layout_bugs.wrong_tensor_parallel_shard),
}


@pytest.fixture(scope="module")
def reference(single_rank):
    return single_rank.reference([], STEPS)


@pytest.fixture(scope="module")
def runs():
    """Every layout, trained once: two spawns (2 and 4 ranks) running several layouts each."""
    two = {**TWO_RANK_LAYOUTS, **{name: overrides for name, (overrides, _) in BUGGED.items()}}
    return train_named_layouts({2: two, 4: FOUR_RANK_LAYOUTS}, STEPS, bugs={k: bug for k, (_, bug) in BUGGED.items()})


def test_reference_loss_falls(reference):
    assert reference.losses[-1] < reference.losses[0] - 0.3, reference.losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank_loss_and_weights(layout, runs, reference, single_rank):
    tolerance = single_rank.tolerance([], STEPS, layout=LAYOUTS[layout][0])
    assert_matches_reference(layout, runs[layout], reference, tolerance)


@pytest.mark.parametrize("layout", list(BUGGED))
def test_the_measured_tolerance_fails_a_layout_bug_by_orders_of_magnitude(layout, runs, reference, single_rank):
    tolerance = single_rank.tolerance([], STEPS, layout=BUGGED[layout][0])
    with pytest.raises(AssertionError) as failure:
        assert_matches_reference(layout, runs[layout], reference, tolerance)
    weight_diff = max_weight_diff(runs[layout].state_dict, reference.state_dict)
    print(f"{layout}: caught, weight diff {weight_diff:.2e} = {weight_diff / tolerance.weight:.0f} x the tolerance")
    assert "max weight diff" in str(failure.value)
    assert weight_diff > 100 * tolerance.weight


def _local_parameter_count(cfg) -> int:
    """Parameters held by one TP rank: every matrix sharded t ways, the 2L + 1 norm vectors replicated."""
    m, t = cfg.model, cfg.parallel.tp
    d = m.head_dim
    per_layer = m.hidden_size * d * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.hidden_size * m.ffn_hidden_size
    matrices = m.num_layers * per_layer + 2 * m.vocab_size * m.hidden_size
    return matrices // t + (2 * m.num_layers + 1) * m.hidden_size


def expected_step_traffic(cfg) -> dict:
    """{(group, op): bytes} of one training step, from the formulas in the module docstring."""
    m, p, train = cfg.model, cfg.parallel, cfg.train
    b, s, h, L = train.micro_batch_size, m.seq_length, m.hidden_size, m.num_layers
    microbatches = train.global_batch_size // (b * p.dp)
    E = b * s * h * 4
    expected = {}
    if p.tp > 1:
        if p.sequence_parallel:
            expected[("tp", "all_gather")] = (4 * L + 2) * E * microbatches
            expected[("tp", "reduce_scatter")] = (4 * L + 2) * E * microbatches
            expected[("tp", "sequence_parallel_grads")] = (2 * L + 1) * h * 4
        else:
            expected[("tp", "all_reduce")] = (4 * L + 2) * E * microbatches
        expected[("tp", "cross_entropy")] = 3 * b * s * 4 * microbatches
        expected[("tp-pp", "grad_norm")] = 4
    if p.dp > 1:
        expected[("dp", "all_reduce")] = _local_parameter_count(cfg) * 4
        expected[("dp", "metrics")] = 4
    return expected


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_traffic_equals_the_formulas_exactly(layout, runs):
    overrides, world = LAYOUTS[layout]
    cfg = parity_config(overrides, world, STEPS)
    run = runs[layout]
    expected = expected_step_traffic(cfg)
    for rank, ledger in enumerate(run.ledgers):
        assert ledger == expected, f"rank {rank}"


@pytest.mark.parametrize("layout", ["dp2", "dp4", "tp2_dp2"])
def test_dp_reduces_the_whole_gradient_buffer_once_per_step_in_buckets(layout, runs):
    run = runs[layout]
    assert run.ledgers[0][("dp", "all_reduce")] == run.grad_buffer_bytes[0]
    # 0.1 MiB buckets cut the buffer into several reductions: one per bucket, together one pass.
    assert run.num_buckets > 1
    assert run.calls[0][("dp", "all_reduce")] == run.num_buckets


def test_dp_traffic_does_not_depend_on_the_microbatch_count(runs):
    # dp2 runs 2 microbatches per rank, dp4 one: the same full-model gradient bytes per step.
    assert runs["dp2"].num_microbatches == 2 and runs["dp4"].num_microbatches == 1
    assert runs["dp2"].ledgers[0][("dp", "all_reduce")] == runs["dp4"].ledgers[0][("dp", "all_reduce")]

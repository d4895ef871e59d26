"""Pipeline parallelism reproduces the single-rank run, and its stages exchange exactly the bytes the schedule implies.

Parity: per-step loss (relative) and final gathered weights (max abs) within the measured
tolerance (tests/noise_floor.py) of the single-rank run of the same model, over ten fp32 steps: pp=2, pp=4 (4 layers), interleaved pp=2
v=2 (4 layers), tied embeddings under pp=2, interleaved pp=2 v=2 x dp=2 with several gradient
buckets, and tp=2 x pp=2 x dp=2 on 8 ranks.

Traffic, per step: with m microbatches per DP rank and E = b * s * h * 4 bytes (one fp32
activation between stages), every boundary between consecutive model chunks carries m * E forward
(activations) and m * E backward (their gradients): 2 * m * E per boundary, pp*v - 1 boundaries,
so v times the p2p traffic of plain 1F1B for interleaving. Each send is booked once, on the sender.
"""
import pytest
import torch

from tests.parity import assert_matches_reference, parity_config, train_named_layouts

STEPS = 10
FOUR_LAYERS = "model.num_layers=4"
TIED = "model.tie_embeddings=true"
SMALL_BUCKETS = "parallel.grad_bucket_mb=0.02"  # several DP buckets, some spanning both chunks
SPAWNS = {
    2: {
        "pp2": ["parallel.pp=2"],
        "pp2_v2": ["parallel.pp=2", "parallel.virtual_stages=2", FOUR_LAYERS],
        "pp2_tied": ["parallel.pp=2", TIED],
    },
    4: {
        "pp4": ["parallel.pp=4", FOUR_LAYERS],
        "pp2_v2_dp2": ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.dp=2", FOUR_LAYERS, SMALL_BUCKETS],
    },
    8: {
        "tp2_pp2_dp2": ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"],
    },
}
LAYOUTS = {name: (overrides, world) for world, layouts in SPAWNS.items() for name, overrides in layouts.items()}


def model_overrides(overrides):
    """The overrides that change the model itself: the single-rank reference trains the same one."""
    return tuple(o for o in overrides if o.startswith("model."))


MODELS = sorted({model_overrides(overrides) for overrides, _ in LAYOUTS.values()})


@pytest.fixture(scope="module")
def references(single_rank):
    return {model: single_rank.reference(model, STEPS) for model in MODELS}




@pytest.fixture(scope="module")
def runs():
    """Every layout trained once: one spawn per world size, several layouts each."""
    return train_named_layouts(SPAWNS, STEPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank_loss_and_weights(layout, runs, references, single_rank):
    overrides, _ = LAYOUTS[layout]
    model = model_overrides(overrides)
    run, reference = runs[layout], references[model]
    state = dict(run.state_dict)
    if TIED in overrides:
        state.pop("lm_head.weight")  # the last stage's copy of the embedding, checked below
    assert_matches_reference(layout, run, reference, single_rank.tolerance(model, STEPS, layout=overrides), state=state)
    assert reference.losses[-1] < reference.losses[0] - 0.3  # it learnt something


def test_tied_embedding_copies_on_first_and_last_stage_stay_bitwise_equal(runs):
    state = runs["pp2_tied"].state_dict
    # Gathered from rank 0 (first stage) and rank 1 (last stage) after ten AdamW steps.
    assert torch.equal(state["lm_head.weight"], state["embed_tokens.weight"])


def expected_pipeline_traffic(cfg, stage: int) -> dict:
    """{(group, op): bytes} of stage `stage`'s p2p in one step, from the module docstring."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    local_seq = m.seq_length // (p.tp if p.sequence_parallel else 1)
    E = t.micro_batch_size * local_seq * m.hidden_size * 4
    microbatches = t.global_batch_size // (t.micro_batch_size * p.dp)
    last = p.pp * p.virtual_stages - 1
    model_chunks = [c * p.pp + stage for c in range(p.virtual_stages)]
    return {("pp", "send_forward"): microbatches * E * sum(k != last for k in model_chunks),
            ("pp", "send_backward"): microbatches * E * sum(k != 0 for k in model_chunks)}


def stage_of(cfg, rank: int) -> int:
    return rank // (cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.dp)  # pp is the slowest axis


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_p2p_bytes_per_step_are_two_activations_per_microbatch_per_boundary(layout, runs):
    overrides, world = LAYOUTS[layout]
    cfg = parity_config(overrides, world, STEPS)
    run = runs[layout]
    for rank, ledger in enumerate(run.ledgers):
        expected = {k: v for k, v in expected_pipeline_traffic(cfg, stage_of(cfg, rank)).items() if v}
        assert {k: v for k, v in ledger.items() if k[1].startswith("send_")} == expected, f"rank {rank}"
        assert ledger[("pp", "metrics")] == 4  # the loss sum, known on the last stage
    # Summed over one pipeline (one rank per stage): 2 * m * E per boundary between model chunks.
    p, t = cfg.parallel, cfg.train
    local_seq = cfg.model.seq_length // (p.tp if p.sequence_parallel else 1)
    E = t.micro_batch_size * local_seq * cfg.model.hidden_size * 4
    m = t.global_batch_size // (t.micro_batch_size * p.dp)
    one_pipeline = [run.ledgers[stage * p.tp * p.dp] for stage in range(p.pp)]
    total = sum(v for ledger in one_pipeline for k, v in ledger.items() if k[0] == "pp" and k[1].startswith("send_"))
    assert total == 2 * m * E * (p.pp * p.virtual_stages - 1)


@pytest.mark.parametrize("layout", ["pp2", "pp2_v2", "pp4"])
def test_a_pure_pipeline_step_moves_nothing_else(layout, runs):
    overrides, world = LAYOUTS[layout]
    cfg = parity_config(overrides, world, STEPS)
    for rank, ledger in enumerate(runs[layout].ledgers):
        expected = {k: v for k, v in expected_pipeline_traffic(cfg, rank).items() if v}
        expected.update({("pp", "metrics"): 4, ("tp-pp", "grad_norm"): 4})
        assert ledger == expected, f"rank {rank}"


def test_tied_embedding_grads_are_summed_between_first_and_last_stage_only(runs):
    cfg = parity_config(LAYOUTS["pp2_tied"][0], 2, STEPS)
    for ledger in runs["pp2_tied"].ledgers:
        assert ledger[("embedding", "tied_embedding_grads")] == cfg.model.vocab_size * cfg.model.hidden_size * 4
    no_tie = runs["pp2"].ledgers
    assert all(k[0] != "embedding" for ledger in no_tie for k in ledger)


def test_interleaved_dp_reduces_every_bucket_once_during_each_chunks_last_backward(runs):
    # Buckets may hold parameters of both chunks; each launches when its parameters' last
    # gradients (from each chunk's last microbatch) are in: one reduction per bucket, all bytes once.
    run = runs["pp2_v2_dp2"]
    assert min(run.buckets) > 2
    for rank, ledger in enumerate(run.ledgers):
        assert ledger[("dp", "all_reduce")] == run.grad_buffer_bytes[rank]
        assert run.calls[rank][("dp", "all_reduce")] == run.buckets[rank]


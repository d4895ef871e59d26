"""parallel/pipeline.py as arithmetic: layer partitions, the 1F1B and interleaved orders of
Narayanan et al. 2021 (fig. 4) written out by hand, and the bubble they imply.

Notation: F1.3 is the forward of microbatch 3 on the rank's local chunk 1 (model chunk 1*pp + rank).
In a p2p plan, [sF>2.1 rB>0.3] is one batch posted together: send the activation into model chunk 2
for microbatch 1, receive the gradient of model chunk 0's output for microbatch 3.
"""
import pytest

from engine.config import ConfigError, load_config
from engine.config_validation import validate
from parallel.pipeline import (Action, PipelineError, interleaved_order, max_in_flight, one_f_one_b_order, p2p_plan,
                               partition_layers, schedule_order, simulate, stage_layer_ids)
from parallel.layout import ParallelLayout
from tests.parity import TINY_CONFIG


def written(order) -> str:
    return " ".join(repr(a) for a in order)


# 1F1B: stage r runs pp - r - 1 warm-up forwards, then alternates one forward and one backward.
ONE_F_ONE_B = {
    (2, 0, 4): "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 B0.3",
    (2, 1, 4): "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3",
    (4, 0, 8): "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 F0.6 B0.3 F0.7 B0.4 B0.5 B0.6 B0.7",
    (4, 1, 8): "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 F0.4 B0.2 F0.5 B0.3 F0.6 B0.4 F0.7 B0.5 B0.6 B0.7",
    (4, 3, 8): "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3 F0.4 B0.4 F0.5 B0.5 F0.6 B0.6 F0.7 B0.7",
    (4, 0, 4): "F0.0 F0.1 F0.2 F0.3 B0.0 B0.1 B0.2 B0.3",
}

# Interleaved: microbatches in groups of pp per chunk; warm-up 2*(pp - r - 1) + (v - 1)*pp forwards;
# backwards walk the chunks in reverse. (4, 0, 8, 2) is device 1 of the paper's figure 4 (bottom).
INTERLEAVED = {
    (2, 0, 4, 2): "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3",
    (2, 1, 4, 2): "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3",
    (4, 0, 8, 2): ("F0.0 F0.1 F0.2 F0.3 F1.0 F1.1 F1.2 F1.3 F0.4 F0.5 "
                   "F0.6 B1.0 F0.7 B1.1 F1.4 B1.2 F1.5 B1.3 F1.6 B0.0 F1.7 B0.1 "
                   "B0.2 B0.3 B1.4 B1.5 B1.6 B1.7 B0.4 B0.5 B0.6 B0.7"),
    (4, 3, 8, 2): ("F0.0 F0.1 F0.2 F0.3 "
                   "F1.0 B1.0 F1.1 B1.1 F1.2 B1.2 F1.3 B1.3 F0.4 B0.0 F0.5 B0.1 F0.6 B0.2 F0.7 B0.3 "
                   "F1.4 B1.4 F1.5 B1.5 F1.6 B1.6 F1.7 B1.7 B0.4 B0.5 B0.6 B0.7"),
}


@pytest.mark.parametrize("pp,rank,m", list(ONE_F_ONE_B))
def test_one_f_one_b_order_matches_the_paper(pp, rank, m):
    assert written(one_f_one_b_order(pp, rank, m)) == ONE_F_ONE_B[(pp, rank, m)]


@pytest.mark.parametrize("pp,rank,m,v", list(INTERLEAVED))
def test_interleaved_order_matches_the_paper(pp, rank, m, v):
    assert written(interleaved_order(pp, rank, m, v)) == INTERLEAVED[(pp, rank, m, v)]


LAYOUTS = [(pp, m, v) for pp in (1, 2, 3, 4) for v in (1, 2, 3) for m in (pp, 2 * pp, 4 * pp)
           if not (pp == 1 and v > 1)] + [(4, 2, 1), (3, 5, 1)]


def written_plan(plan) -> str:
    return " ".join(repr(s) if isinstance(s, Action) else
                    "[" + " ".join([f"s{m!r}" for m in s.sends] + [f"r{m!r}" for m in s.recvs]) + "]" for s in plan)


# The batches between actions (Megatron-Core's combined send/recv calls); each batch's sends were
# produced by the unit before it, its receives feed the unit after it. Interleaved steady-state
# forward-backward pairs run as one unit. Checked against NCCL's rules in tests/test_p2p_check.py.
P2P_PLANS = {
    (2, 0, 3, 1): "F0.0 [sF>1.0] F0.1 [sF>1.1 rB>0.0] B0.0 F0.2 [sF>1.2 rB>0.1] B0.1 [rB>0.2] B0.2",
    (2, 1, 3, 1): "[rF>1.0] F0.0 B0.0 [sB>0.0 rF>1.1] F0.1 B0.1 [sB>0.1 rF>1.2] F0.2 B0.2 [sB>0.2]",
    (2, 1, 4, 2): ("[rF>1.0] F0.0 [sF>2.0 rF>1.1] F0.1 [sF>2.1 rF>3.0] F1.0 B1.0 [sB>2.0 rF>3.1] F1.1 B1.1 "
                   "[sB>2.1 rF>1.2 rB>1.0] F0.2 B0.0 [sF>2.2 sB>0.0 rF>1.3 rB>1.1] F0.3 B0.1 [sF>2.3 sB>0.1 rF>3.2] "
                   "F1.2 B1.2 [sB>2.2 rF>3.3] F1.3 B1.3 [sB>2.3 rB>1.2] B0.2 [sB>0.2 rB>1.3] B0.3 [sB>0.3]"),
}


@pytest.mark.parametrize("pp,rank,m,v", list(P2P_PLANS))
def test_p2p_plan_batches_each_units_sends_with_the_next_units_receives(pp, rank, m, v):
    assert written_plan(p2p_plan(schedule_order(pp, rank, m, v), pp, rank, v)) == P2P_PLANS[(pp, rank, m, v)]


def test_p2p_plan_refuses_an_order_that_is_not_interleaved_1f1b():
    order = schedule_order(2, 0, 4, 2)
    with pytest.raises(PipelineError, match="is not interleaved 1F1B with 4 warm-up forwards"):
        p2p_plan(order[:5] + order[6:7] + order[5:6] + order[7:], 2, 0, 2)


@pytest.mark.parametrize("pp,m,v", LAYOUTS)
def test_every_forward_and_backward_runs_once_backward_after_forward(pp, m, v):
    for rank in range(pp):
        order = schedule_order(pp, rank, m, v)
        assert sorted(order) == sorted((kind, c, j) for kind in "FB" for c in range(v) for j in range(m))
        seen = set()
        for action in order:
            if action.kind == "B":
                assert ("F", action.chunk, action.microbatch) in seen, (rank, action)
            seen.add(tuple(action))


@pytest.mark.parametrize("pp,m,v", LAYOUTS)
def test_schedules_are_deadlock_free_and_their_bubble_is_the_papers(pp, m, v):
    # Unit costs (backward = 2 x forward), free non-blocking sends: idle / busy time of every rank
    # is exactly (p-1)/m for 1F1B and (1/v)(p-1)/m interleaved.
    sim = simulate(pp, m, v)
    for rank in range(pp):
        assert sim.bubble_fraction(rank) == pytest.approx((pp - 1) / (v * m), abs=1e-12)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 2)])
def test_one_f_one_b_holds_at_most_pp_minus_rank_microbatches(pp, m):
    assert [max_in_flight(one_f_one_b_order(pp, r, m)) for r in range(pp)] == [min(pp - r, m) for r in range(pp)]


def test_interleaved_needs_microbatches_divisible_by_pp():
    with pytest.raises(PipelineError, match=r"microbatch count \(6\) divisible by parallel.pp=4"):
        interleaved_order(4, 0, 6, 2)


def test_partition_is_contiguous_balanced_and_in_interleaved_chunk_order():
    assert partition_layers(4, 2) == [[0, 1], [2, 3]]
    assert partition_layers(5, 2) == [[0, 1, 2], [3, 4]]  # the extra layer goes to the earlier stage
    assert partition_layers(7, 2, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    # Chunk c of stage r is model chunk c*pp + r: stage 1 of pp=2, v=2 holds model chunks 1 and 3.
    assert stage_layer_ids(7, 2, 2, 1) == [[2, 3], [6]]
    assert stage_layer_ids(8, 4, 2, 0) == [[0], [4]]
    for layers, pp, v in [(10, 4, 1), (9, 2, 2), (4, 4, 1), (13, 3, 2)]:
        parts = partition_layers(layers, pp, v)
        assert sum(parts, []) == list(range(layers))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_fewer_layers_than_chunks_is_refused_naming_the_fields():
    with pytest.raises(PipelineError, match=r"model.num_layers=3 cannot fill pp\*virtual_stages = 2\*2 = 4"):
        partition_layers(3, 2, 2)
    cfg = load_config(TINY_CONFIG, ["model.num_layers=3", "parallel.pp=2", "parallel.virtual_stages=2"])
    with pytest.raises(ConfigError, match="num_layers=3"):
        validate(cfg, world_size=2)


def test_embedding_group_is_first_and_last_stage_of_each_pp_group():
    dims = ParallelLayout(tp=2, pp=4)
    assert dims.groups("pp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.groups("embedding") == [[0, 6], [1, 7]]
    assert dims.group_of("embedding", 7) == [1, 7]
    assert dims.group_of("embedding", 2) == [2]  # a middle stage holds no embedding copy
    assert ParallelLayout(dp=2).groups("embedding") == [[0], [1]]

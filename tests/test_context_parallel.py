"""Context parallelism: the zigzag split, ring attention against full-sequence attention, parity and traffic.

Ring attention is checked on real gloo rings of 2 and 4 ranks against F.scaled_dot_product_attention
over the whole sequence: in fp64 to ~1e-12 (the math is exact, not just close), in fp32 and bf16
within twice the noise floor (the single-device kernel's own error in that dtype, printed);
forward and the gradients of q, k and v; GQA and MHA.

Parity: cp=2, cp=4, cp=2 x tp=2 with sequence parallelism, cp=2 x dp=2 and (8 ranks, marked
slow) tp=2 x pp=2 x cp=2 reproduce the single-rank run over ten fp32 steps of the tiny parity
model: per-step loss (relative) and final weights (max abs) within the measured tolerance of the
TP/DP parity tests (tests/noise_floor.py), and the final weights also relative to their norm
(per parameter), within FACTOR x what the reordered single-rank run shows.

Traffic of one attention call on each rank (ledger group 'cp', booked by the sender), with
B_kv = b * (s/cp) * kv_heads * d * element_size the bytes of the local K (or V):
    ring_kv          = 2 * (cp-1) * B_kv         forward: K and V passed cp-1 times
    ring_kv_backward = 2 * (cp-1) * B_kv         backward: K and V passed around again
    ring_dkv         = 2 * (cp-1) * B_kv * max(4, element_size) / element_size
                                                 dK/dV accumulators (fp32; fp64 for fp64), cp-1 hops home
each in cp-1 messages. Per training step that is L layers x m microbatches of it; the gradients
(dp-cp/all_reduce, the whole buffer once) and the loss sum (dp-cp/metrics, 4 bytes) are reduced
over dp x cp, and TP terms are those of tests/test_parity_tp_dp.py on the s/cp local tokens.
Under pipeline parallelism a stage runs L/pp layers, so its ring traffic is L/pp x m x the above.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from parallel.context_parallel import (context_parallel_positions, merge_context_parallel_shards,
                                       split_for_context_parallel, zigzag_chunks)
from tests.distributed import run_distributed
from tests.noise_floor import EPS32, FACTOR, MIN_ULPS
from tests.parity import assert_matches_reference, parity_config, train_layouts, train_named_layouts
from tests.test_parity_tp_dp import _local_parameter_count, expected_step_traffic

STEPS = 10
TWO_RANK_LAYOUTS = {"cp2": ["parallel.cp=2"]}
FOUR_RANK_LAYOUTS = {
    "cp4": ["parallel.cp=4"],
    "cp2_tp2_sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2_dp2": ["parallel.cp=2", "parallel.dp=2"],
}
LAYOUTS = {**{k: (v, 2) for k, v in TWO_RANK_LAYOUTS.items()}, **{k: (v, 4) for k, v in FOUR_RANK_LAYOUTS.items()}}
FULL_4D = ["parallel.tp=2", "parallel.pp=2", "parallel.cp=2"]  # 8 ranks: ~50 s here, so marked slow
# (dtype, q heads, kv heads, tolerance) of the ring-attention checks; b=2, s=32, d=8. In fp64 the
# reference is the same precision, so the ring must be exact to 1e-12; in fp32 and bf16 (None) it
# must stay within twice the noise floor: the error of the single-device kernel (SDPA over the
# whole sequence in that dtype) against fp64, measured beside it and printed.
# The cases with documents (last field) attend within documents of DOCUMENT_LENGTHS (one row each):
# short documents make some ring blocks skipped, some partly masked, some whole.
RING_CASES = [(torch.float64, 4, 2, 1e-12, False), (torch.float64, 4, 4, 1e-12, False),
              (torch.float32, 4, 2, None, False), (torch.bfloat16, 4, 2, None, False),
              (torch.float64, 4, 2, 1e-12, True), (torch.float32, 4, 2, None, True),
              (torch.bfloat16, 4, 2, None, True)]
DOCUMENT_LENGTHS = ([3, 9, 1, 12, 7], [20, 12])


# ---------------------------------------------------------------------------------------------
# The load-balanced split


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_split_reassembles_the_sequence_and_its_positions(cp):
    seq = 16
    x = torch.randn(3, seq, 5)
    shards = [split_for_context_parallel(x, 1, r, cp) for r in range(cp)]
    assert all(s.shape == (3, seq // cp, 5) for s in shards)
    assert torch.equal(merge_context_parallel_shards(shards, 1), x)
    positions = [context_parallel_positions(seq, r, cp) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(positions)).values, torch.arange(seq))
    n = seq // (2 * cp)
    for r in range(cp):
        first, second = zigzag_chunks(r, cp)
        assert (first, second) == (r, 2 * cp - 1 - r)
        expected = torch.cat((torch.arange(first * n, (first + 1) * n), torch.arange(second * n, (second + 1) * n)))
        assert torch.equal(positions[r], expected)
        assert torch.equal(shards[r], x[:, expected])  # the tokens are the ones at those positions


def test_zigzag_split_balances_causal_work():
    # Token at position p attends to p + 1 keys: every CP rank gets the same total.
    seq, cp = 64, 4
    work = [int((context_parallel_positions(seq, r, cp) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1 and sum(work) == seq * (seq + 1) // 2
    contiguous = [int((torch.arange(seq).chunk(cp)[r] + 1).sum()) for r in range(cp)]
    assert len(set(contiguous)) == cp  # a plain split would not be balanced


def test_split_rejects_a_length_not_divisible_by_twice_cp():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp = 4"):
        split_for_context_parallel(torch.zeros(2, 6), 1, 0, 2)


# ---------------------------------------------------------------------------------------------
# Ring attention on real rings


def _ring_attention_worker(rank: int, world_size: int, cases) -> list:
    import torch.distributed as dist

    from parallel.collectives import CommLedger, Group
    from parallel.context_parallel import ring_attention

    from engine.model.document_attention import DocumentSegments
    from parallel.context_parallel import RingAttention

    results = []
    for dtype, hq, hkv, _, docs in cases:
        gen = torch.Generator().manual_seed(hq * 10 + hkv)  # the same full tensors on every rank
        b, s, d = 2, 32, 8
        q, grad = (torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64) for _ in range(2))
        full = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in DOCUMENT_LENGTHS])
        # The reference: one dense mask, a query seeing the earlier keys of its own document.
        mask = (ids[:, None, :, None] == ids[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
        kwargs = {"attn_mask": mask} if docs else {"is_causal": True}
        reference = F.scaled_dot_product_attention(*(t.double() for t in full), enable_gqa=hq != hkv, **kwargs)
        reference.backward(grad)
        # The noise floor: the single-device kernel in `dtype` on the whole sequence, against fp64.
        alone = [t.detach().clone().requires_grad_() for t in full]
        single = F.scaled_dot_product_attention(*alone, enable_gqa=hq != hkv, **kwargs)
        single.backward(grad.to(dtype))
        floor = max([(single.double() - reference).abs().max().item()]
                    + [(a.grad.double() - f.grad).abs().max().item() for a, f in zip(alone, full)])

        def local(t):
            return split_for_context_parallel(t.detach(), 2, rank, world_size)

        ledger = CommLedger()
        group = Group("cp", dist.group.WORLD, world_size, rank, ledger)
        q_l, k_l, v_l = (local(t).requires_grad_() for t in full)
        out = (RingAttention(group)(q_l, k_l, v_l, DocumentSegments(ids)) if docs
               else ring_attention(q_l, k_l, v_l, group))
        out.backward(local(grad).to(dtype))
        errors = {"out": (out.double() - local(reference)).abs().max().item(), "dtype": out.dtype}
        for name, mine, whole in (("dq", q_l, full[0]), ("dk", k_l, full[1]), ("dv", v_l, full[2])):
            errors[name] = (mine.grad.double() - local(whole.grad)).abs().max().item()
        errors["floor"] = floor
        results.append((errors, dict(ledger.bytes), dict(ledger.calls)))
    return results


@pytest.fixture(scope="module")
def ring_results():
    return {world: run_distributed(_ring_attention_worker, world, RING_CASES, timeout=120) for world in (2, 4)}


def _case_id(case):
    return f"{str(case[0]).split('.')[-1]}-hq{case[1]}-hkv{case[2]}" + ("-documents" if case[4] else "")


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", range(len(RING_CASES)), ids=[_case_id(c) for c in RING_CASES])
def test_ring_attention_equals_full_causal_attention_forward_and_backward(world, case, ring_results):
    dtype, _, _, tolerance, _ = RING_CASES[case]
    for rank, rank_results in enumerate(ring_results[world]):
        errors = dict(rank_results[case][0])
        assert errors.pop("dtype") == dtype
        floor = errors.pop("floor")
        limit = tolerance if tolerance is not None else 2 * floor
        print(f"cp={world} rank {rank} {_case_id(RING_CASES[case])}: ring error {max(errors.values()):.1e} "
              f"(out/dq/dk/dv), single-device kernel's error {floor:.1e}, limit {limit:.1e}")
        assert max(errors.values()) <= limit, f"rank {rank}: {errors}"


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", range(len(RING_CASES)), ids=[_case_id(c) for c in RING_CASES])
def test_ring_attention_traffic_per_call(world, case, ring_results):
    dtype, _, hkv, _, _ = RING_CASES[case]
    b, s, d = 2, 32, 8
    size = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = b * (s // world) * hkv * d * size
    accumulator_size = max(size, 4)
    expected = {("cp", "ring_kv"): 2 * (world - 1) * kv_bytes,
                ("cp", "ring_kv_backward"): 2 * (world - 1) * kv_bytes,
                ("cp", "ring_dkv"): 2 * (world - 1) * kv_bytes * accumulator_size // size}
    for rank, rank_results in enumerate(ring_results[world]):
        _, ledger, calls = rank_results[case]
        assert ledger == expected, f"rank {rank}"
        assert calls == dict.fromkeys(expected, world - 1), f"rank {rank}"  # one message per hop


# ---------------------------------------------------------------------------------------------
# Parity with the single-rank run, and the step's traffic


@pytest.fixture(scope="module")
def reference(single_rank):
    return single_rank.reference([], STEPS)




@pytest.fixture(scope="module")
def runs():
    return train_named_layouts({2: TWO_RANK_LAYOUTS, 4: FOUR_RANK_LAYOUTS}, STEPS)


def _max_relative_weight_diff(state: dict, reference: dict) -> float:
    return max(((state[name] - ref).norm() / ref.norm()).item() for name, ref in reference.items())


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_matches_single_rank_loss_and_weights(layout, runs, reference, single_rank):
    assert reference.losses[-1] < reference.losses[0] - 0.3  # the run learns, so parity means something
    _assert_matches(layout, LAYOUTS[layout][0], runs[layout], reference, single_rank)


def _assert_matches(layout, overrides, run, reference, single_rank):
    assert_matches_reference(layout, run, reference, single_rank.tolerance([], STEPS, layout=overrides))
    floor = _max_relative_weight_diff(single_rank.reordered([], STEPS, layout=overrides).state_dict, reference.state_dict)
    limit = max(FACTOR * floor, MIN_ULPS * EPS32)
    relative_weight_diff = _max_relative_weight_diff(run.state_dict, reference.state_dict)
    print(f"{layout}: max relative weight diff {relative_weight_diff:.2e} (tolerance {limit:.2e}, floor {floor:.2e})")
    assert relative_weight_diff <= limit


def expected_cp_step_traffic(cfg) -> dict:
    """{(group, op): bytes} of one training step with context parallelism (module docstring)."""
    m, p, train = cfg.model, cfg.parallel, cfg.train
    s_local = m.seq_length // p.cp
    # TP and SP act on the s/cp local tokens exactly as on a shorter sequence; DP terms move to dp-cp.
    local = replace(cfg, model=replace(m, seq_length=s_local))
    expected = {key: n for key, n in expected_step_traffic(local).items() if key[0] != "dp"}
    expected.update(expected_ring_traffic(cfg))
    expected.update({("dp-cp", "all_reduce"): _local_parameter_count(cfg) * 4, ("dp-cp", "metrics"): 4})
    return expected


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_step_traffic_equals_the_formulas_exactly(layout, runs):
    overrides, world = LAYOUTS[layout]
    cfg = parity_config(overrides, world, STEPS)
    expected = expected_cp_step_traffic(cfg)
    for rank, ledger in enumerate(runs[layout].ledgers):
        assert ledger == expected, f"rank {rank}"


def expected_ring_traffic(cfg) -> dict:
    """{('cp', op): bytes} of one step on any rank: L/pp layers x m microbatches x one call's ring traffic."""
    m, p, train = cfg.model, cfg.parallel, cfg.train
    b, s_local = train.micro_batch_size, m.seq_length // p.cp
    microbatches = train.global_batch_size // (b * p.dp)
    kv_bytes = b * s_local * (m.num_kv_heads // p.tp) * m.head_dim * 4
    ring = m.num_layers // p.pp * microbatches * 2 * (p.cp - 1) * kv_bytes
    return {("cp", "ring_kv"): ring, ("cp", "ring_kv_backward"): ring, ("cp", "ring_dkv"): ring}


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_pp2_cp2_matches_single_rank_and_moves_the_ring_bytes(reference, single_rank):
    run = train_layouts([FULL_4D], 8, STEPS)[0]
    _assert_matches("tp2_pp2_cp2", FULL_4D, run, reference, single_rank)
    expected = expected_ring_traffic(parity_config(FULL_4D, 8, STEPS))
    for rank, ledger in enumerate(run.ledgers):
        assert {k: v for k, v in ledger.items() if k[0] == "cp"} == expected, f"rank {rank}"
        # Gradients over dp x cp: the whole (stage's) buffer once; the loss sum once.
        assert ledger[("dp-cp", "all_reduce")] == run.grad_buffer_bytes[rank]
        assert ledger[("dp-cp", "metrics")] == 4


def test_ring_document_masks_skip_blocks_no_query_sees_and_drop_whole_ones():
    """What each ring step runs with documents: the diagonal always masked (causal within documents),
    a block whose documents do not meet skipped, a block inside one document unmasked."""
    from parallel.context_parallel import SKIP, ring_document_masks

    def kinds(lengths, rank, cp):
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        return ["skip" if m is SKIP else "whole" if m is None else "masked"
                for m in ring_document_masks(ids, rank, cp, torch.float32)]

    assert kinds([32], 1, 4) == ["masked", "whole", "whole", "whole"]  # one document: plain causal ring
    # Documents [3, 9, 1, 12, 7] over 8 chunks of 4: rank 0 holds tokens 0-3 and 28-31 (documents
    # 0, 1 and 4); the K/V of ranks 3 and 2 (steps 1 and 2: documents 1-3) meet none of its queries.
    assert kinds([3, 9, 1, 12, 7], 0, 4) == ["masked", "skip", "skip", "masked"]
    assert kinds([3, 9, 1, 12, 7], 3, 4) == ["masked", "skip", "skip", "skip"]

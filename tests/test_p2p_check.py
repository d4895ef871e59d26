"""Point-to-point under NCCL's rules: the checker itself, the engine's plans through it, and the old order.

The checker (parallel/p2p_check.py) replays every rank's p2p ops with one FIFO channel per ordered
rank pair, no tags, rendezvous sends, batches that post together, and ops a rank does not wait on
serialised per peer. Proven here:
- the checker finds facing sends, swapped same-shape messages and shape mismatches, and lets a
  batched exchange between two ranks through (cases built by hand);
- the engine's pipeline plans (1F1B and interleaved, pp 2..8 x v 1..4 x several microbatch counts)
  and ring attention (cp 2..8, alone and inside pipelines, with and without recompute) are
  deadlock-free and every message arrives as what its receiver expects;
- StageComm/run_schedule and ring_attention issue exactly the ops of those plans (recorded);
- the order the engine used before batching deadlocks (tests/golden/legacy_p2p_calls.json holds
  the calls that code issued, recorded at commit 11574ef by replacing its irecv/isend with
  recorders and running run_schedule for pp 2..4 x v 1..2 and ring_attention for cp 2..4) in
  every recorded pipeline layout and in the cp=2 ring.
"""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import parallel.context_parallel as context_parallel
import parallel.pipeline as pipeline
from parallel.collectives import CommLedger, Group
from parallel.p2p_check import RECV, SEND, WAIT_ALL, Batch, Op, P2PError, check, pipeline_programs, ring_programs

LEGACY = json.loads((Path(__file__).parent / "golden" / "legacy_p2p_calls.json").read_text())


def send(peer, label, shape=(2,)):
    return Op(SEND, "pp", peer, label, shape)


def recv(peer, label, shape=(2,)):
    return Op(RECV, "pp", peer, label, shape)


# ---------------------------------------------------------------------------------------------
# The checker on hand-built programs


def test_two_lone_sends_facing_each_other_deadlock():
    programs = {0: [Batch((send(1, "a"),)), Batch((recv(1, "b"),))],
                1: [Batch((send(0, "b"),)), Batch((recv(0, "a"),))]}
    with pytest.raises(P2PError, match="deadlock.*rank 0.*send 'a' to 1.*rank 1.*send 'b' to 0"):
        check(programs)


def test_the_same_exchange_in_one_batch_per_rank_completes():
    programs = {0: [Batch((send(1, "a"), recv(1, "b")))], 1: [Batch((recv(0, "a"), send(0, "b")))]}
    assert check(programs) == 2


def test_messages_match_in_posting_order_whatever_was_meant():
    # Tags would have matched these; without tags the first send meets the first receive.
    programs = {0: [Batch((send(1, "grad"), send(1, "activation")), wait=False), WAIT_ALL],
                1: [Batch((recv(0, "activation"), recv(0, "grad")))]}
    with pytest.raises(P2PError, match="message #0: rank 0 sends 'grad'.*receives it as 'activation'"):
        check(programs)


def test_a_shape_mismatch_is_reported():
    programs = {0: [Batch((send(1, "x", (2, 3)),))], 1: [Batch((recv(0, "x", (3, 2)),))]}
    with pytest.raises(P2PError, match=r"sends 'x' \(2, 3\).*receives it as 'x' \(3, 2\)"):
        check(programs)


def test_unwaited_ops_to_one_peer_run_in_order_on_its_stream():
    # Rank 0's isend to 1 is not waited, but its receive from 1 queues behind it on the same
    # stream; rank 1 does the same: the two streams wait on each other.
    programs = {0: [Batch((send(1, "a"),), wait=False), Batch((recv(1, "b"),))],
                1: [Batch((send(0, "b"),), wait=False), Batch((recv(0, "a"),))]}
    with pytest.raises(P2PError, match="deadlock"):
        check(programs)
    # Towards different peers the streams are independent: a three-rank ring of the same shape runs.
    ring = {r: [Batch((send((r + 1) % 3, r),), wait=False), Batch((recv((r - 1) % 3, (r - 1) % 3),))]
            for r in range(3)}
    assert check(ring) == 3


def test_a_send_never_received_is_a_deadlock_at_the_end():
    with pytest.raises(P2PError, match="rank 0 .*waits on send 'x' to 1"):
        check({0: [Batch((send(1, "x"),), wait=False), WAIT_ALL], 1: []})


# ---------------------------------------------------------------------------------------------
# The engine's plans


PIPELINE_LAYOUTS = [(pp, v, m) for pp in range(2, 9) for v in range(1, 5)
                    for m in sorted({pp, 2 * pp, 3 * pp} | ({1, pp - 1 or 1, 2 * pp + 1} if v == 1 else set()))]


def test_every_pipeline_layout_is_deadlock_free_and_matched_under_nccl_rules():
    # Interleaved needs microbatches % pp == 0 (all v > 1 counts here are multiples of pp);
    # layers = pp * v, the fewest the engine accepts.
    for pp, v, m in PIPELINE_LAYOUTS:
        matched = check(pipeline_programs(pp, v, m))
        assert matched == 2 * m * (pp * v - 1), (pp, v, m)  # every boundary, both directions, once
    assert len(PIPELINE_LAYOUTS) > 100


@pytest.mark.parametrize("cp", range(2, 9))
def test_ring_attention_alone_and_inside_pipelines_is_deadlock_free_and_matched(cp):
    layouts = [(1, 1, 2, "none"), (2, 1, 3, "selective"), (2, 2, 4, "none")]
    if cp <= 4:
        layouts += [(3, 2, 3, "full"), (4, 1, 4, "none")]
    for pp, v, m, recompute in layouts:
        programs = pipeline_programs(pp, v, m, cp=cp, num_layers=2 * pp * v, recompute=recompute)
        assert len(programs) == pp * cp
        # Per layer and microbatch: K/V in forward, in backward (and in the recomputed forward), and the
        # dK/dV accumulators once.
        passes_per_layer = 2 + (recompute != "none")
        ring = (cp - 1) * cp  # K/V messages of one pass over the ring
        expected = cp * 2 * m * (pp * v - 1) + 2 * pp * v * m * (passes_per_layer * ring + ring)
        assert check(programs) == expected, (cp, pp, v, m)


def test_a_ring_of_bf16_blocks_sends_fp32_accumulators_and_they_match():
    programs = ring_programs(2, "layer0", True, [0, 1], (2, 1, 1, 4, 2), dtype="bfloat16")
    dtypes = Counter(op.dtype for batch in programs[0] for op in batch.ops)
    assert dtypes == {"bfloat16": 2, "float32": 2}
    assert check(programs) == 4


# ---------------------------------------------------------------------------------------------
# The real code issues those plans


class _Recorder:
    """Stands in for collectives.batch_isend_irecv: records each batch's ops, fills receives."""

    def __init__(self):
        self.batches = []

    def __call__(self, ops, group):
        self.batches.append([(op.kind, op.peer, tuple(op.tensor.shape), str(op.tensor.dtype).split(".")[-1],
                              op.purpose) for op in ops])
        for op in ops:
            if op.kind == RECV:
                op.tensor.copy_(torch.linspace(-1, 1, op.tensor.numel()).view_as(op.tensor))
        return []


def _planned(program, to_index):
    return [[(op.kind, to_index(op.peer), op.shape, op.dtype) for op in batch.ops] for batch in program]


@pytest.mark.parametrize("pp,v,m", [(2, 1, 4), (3, 1, 2), (2, 2, 4), (3, 2, 6), (4, 3, 4)])
def test_run_schedule_issues_exactly_the_checked_plan(pp, v, m, monkeypatch):
    shape = (1, 4, 8)
    programs = pipeline_programs(pp, v, m, shape=shape)
    for stage in range(pp):
        recorder = _Recorder()
        monkeypatch.setattr(pipeline, "batch_isend_irecv", recorder)
        comm = pipeline.StageComm(Group("pp", None, pp, stage, CommLedger()), v, shape, torch.float32, "cpu")
        weight = torch.ones((), requires_grad=True)

        def forward_step(chunk, j, x):
            out = (torch.ones(shape) if x is None else x) * weight
            return out.sum() if comm.is_last(chunk) else out

        pipeline.run_schedule(pipeline.schedule_order(pp, stage, m, v), comm, forward_step)
        issued = [[op[:4] for op in batch] for batch in recorder.batches]
        assert issued == _planned(programs[stage], lambda rank: rank), f"stage {stage}"
        purposes = Counter(op[4] for batch in recorder.batches for op in batch if op[0] == SEND)
        chunks = [c * pp + stage for c in range(v)]
        assert purposes == {k: n for k, n in (("send_forward", m * sum(k < pp * v - 1 for k in chunks)),
                                              ("send_backward", m * sum(k > 0 for k in chunks))) if n}


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_attention_issues_exactly_the_checked_ring_plan(cp, dtype, monkeypatch):
    b, hq, hkv, s, d = 1, 2, 1, 4, 2
    for rank in range(cp):
        recorder = _Recorder()
        monkeypatch.setattr(context_parallel, "batch_isend_irecv", recorder)
        group = Group("cp", None, cp, rank, CommLedger())
        q = torch.randn(b, hq, s, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, hkv, s, d, dtype=dtype, requires_grad=True) for _ in range(2))
        context_parallel.ring_attention(q, k, v, group).sum().backward()
        name = str(dtype).split(".")[-1]
        planned = (ring_programs(cp, "f", False, list(range(cp)), (2, b, hkv, s, d), name)[rank]
                   + ring_programs(cp, "b", True, list(range(cp)), (2, b, hkv, s, d), name)[rank])
        issued = [[op[:4] for op in batch] for batch in recorder.batches if batch]
        assert issued == _planned(planned, lambda r: r), f"rank {rank}"


# ---------------------------------------------------------------------------------------------
# The order before batching fails the checker


def _legacy_pipeline_program(log):
    """One stage's recorded calls as NCCL runs them: irecv(...).wait() blocks at once; an isend
    is waited only by finish() at the end; the label is what the tag meant (2*chunk + backward)."""
    program = []
    for i, entry in enumerate(log):
        if entry[0] == "compute":
            continue
        microbatch = ([e for e in log[:i] if e[0] == "compute"][-1] if entry[0] == "isend"
                      else next(e for e in log[i:] if e[0] == "compute"))[3]
        _, peer, tag, shape, dtype = entry[:5]
        label = ("FB"[tag % 2], tag // 2, microbatch)
        kind = SEND if entry[0] == "isend" else RECV
        program.append(Batch((Op(kind, "pp", peer, label, tuple(shape), dtype),), wait=kind == RECV))
    return program + [WAIT_ALL]


def _legacy_ring_program(log):
    """One CP rank's recorded calls: irecv and isend unwaited until the ring's wait (WAIT_ALL)."""
    program, call, seen = [], -1, Counter()
    for entry in log:
        if entry[0] == "call":
            call += 1
        elif entry[0] == "wait_all":
            program.append(WAIT_ALL)
        else:
            kind = SEND if entry[0] == "isend" else RECV
            seen[(kind, call, entry[2])] += 1
            label = (call, entry[2], seen[(kind, call, entry[2])])
            program.append(Batch((Op(kind, "cp", entry[1], label, tuple(entry[3]), entry[4]),), wait=False))
    return program


def _legacy_layouts(kind):
    layouts = {}
    for key, log in LEGACY[kind].items():
        *layout, rank = map(int, key.split(","))
        layouts.setdefault(tuple(layout), {})[rank] = log
    return layouts


def test_the_unbatched_tagged_pipeline_order_deadlocks_in_every_recorded_layout():
    layouts = _legacy_layouts("pipeline")
    assert {(pp, v) for pp, v, _ in layouts} == {(pp, v) for pp in (2, 3, 4) for v in (1, 2)}
    for (pp, v, m), logs in layouts.items():
        with pytest.raises(P2PError, match="deadlock") as error:
            check({stage: _legacy_pipeline_program(log) for stage, log in logs.items()})
        print(f"pp={pp} v={v} m={m}: {str(error.value)[:160]}")
    # pp=2 1F1B: stage 0's second forward send faces stage 1's first backward send.
    with pytest.raises(P2PError, match=r"rank 0 \(entry 3 of 5\) waits on send \('F', 1, 1\).*rank 1.*send \('B', 0, 0\)"):
        check({stage: _legacy_pipeline_program(log) for stage, log in layouts[(2, 1, 2)].items()})


def test_the_unbatched_ring_deadlocks_at_cp2_only():
    layouts = _legacy_layouts("ring")
    programs = {cp: {rank: _legacy_ring_program(log) for rank, log in logs.items()} for (cp,), logs in layouts.items()}
    with pytest.raises(P2PError, match=r"deadlock.*rank 0 .*waits on recv .* from 1, send .* to 1"):
        check(programs[2])
    for cp in (3, 4):  # next and previous rank differ: separate streams, no deadlock
        assert check(programs[cp]) == cp * 3 * (cp - 1)

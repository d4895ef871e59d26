"""Document masks and packed rows in every layout: TP, SP, PP, DP and ZeRO reproduce the single-rank run.

The parity data with data.document_mask and data.reset_position_ids (documents end at the
synthetic stream's EOD token, tests/parity.py's FakeData) and SFT-style loss masks gives the
trainer exactly what packed SFT rows give it: several documents per row, each attending only to
itself, positions restarting at each, the target that starts a document untrained, per-sample
trained-token counts that differ. Each layout's losses and final weights must match the
single-rank run of the same data within the measured tolerance (tests/noise_floor.py), in one
2-rank spawn. Under context parallelism (cp2; cp4 and cp2 x tp2 x sp in a 4-rank spawn)
ring attention masks each block by the documents of its queries and keys, cut from the full
sequence's ids as the tokens were; what the zigzag split gives each rank of the unmasked work
with short documents is measured here (parallel/context_parallel.py's document_work_shares).
"""
import pytest
import torch

from data_pipeline.documents import document_layout, segments_from_eod
from parallel.context_parallel import document_work_shares
from tests.parity import FakeData, assert_matches_reference, parity_config, train_layouts

STEPS = 6
DOCS = ["data.document_mask=true", "data.reset_position_ids=true"]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "dp2_zero1": ["parallel.dp=2", "parallel.zero=1"],
    "dp2_zero2": ["parallel.dp=2", "parallel.zero=2"],
    "dp2_zero3": ["parallel.dp=2", "parallel.zero=3"],
    "cp2": ["parallel.cp=2"],  # ring attention with block masks; positions and masks cut by the zigzag split
}
FOUR_RANK_LAYOUTS = {  # cp4: chunks of 4 tokens, so whole ring blocks fall between documents (skipped)
    "cp4": ["parallel.cp=4"],
    "cp2_tp2_sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
}


@pytest.fixture(scope="module")
def reference(single_rank):
    return single_rank.reference(DOCS, STEPS, masked=True)


@pytest.fixture(scope="module")
def runs():
    """Every layout's run: one spawn per world size."""
    out = {}
    for layouts, world in ((LAYOUTS, 2), (FOUR_RANK_LAYOUTS, 4)):
        overrides = [[*DOCS, *layout] for layout in layouts.values()]
        out.update(zip(layouts, train_layouts(overrides, world, STEPS, masked=True)))
    return out


def test_parity_data_has_several_documents_per_row():
    cfg = parity_config(DOCS, 1, 1)
    mb = FakeData.for_config(cfg, masked=True).microbatch(0, 0, 0, 1)
    assert mb.document_ids is not None and mb.positions is not None
    assert all(int(row.max()) >= 1 for row in mb.document_ids)  # every row holds several documents
    assert (mb.loss_mask.sum(1) < cfg.model.seq_length).all()


def test_document_masks_change_the_run(reference, single_rank):
    plain = single_rank.reference([], STEPS, masked=True)
    assert max(abs(a - b) for a, b in zip(plain.losses, reference.losses)) > 1e-3  # the masks are in effect


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [*LAYOUTS, *FOUR_RANK_LAYOUTS])
def test_layout_with_document_masks_matches_single_rank(layout, runs, reference, single_rank):
    tolerance = single_rank.tolerance(DOCS, STEPS, masked=True, layout={**LAYOUTS, **FOUR_RANK_LAYOUTS}[layout])
    assert_matches_reference(f"documents {layout}", runs[layout], reference, tolerance)


def test_zigzag_share_of_unmasked_attention_work_with_short_documents():
    """Causal rows: zigzag balances exactly. Short documents: the shares drift; printed, bounded."""
    seq, cp = 1024, 4
    whole = torch.zeros(1, seq, dtype=torch.int64)
    assert document_work_shares(whole, cp) == pytest.approx([0.25] * cp)
    gen = torch.Generator().manual_seed(0)
    # Documents of 16..128 tokens (mean ~1/14 of the row): the stream's EOD every so often.
    lengths, total = [], 0
    while total < seq + 1:
        n = min(int(torch.randint(16, 129, (1,), generator=gen)), seq + 1 - total)
        lengths.append(n)
        total += n
    ids = document_layout(lengths, seq)[0][None]
    shares = document_work_shares(ids, cp)
    imbalance = max(shares) / (sum(shares) / cp)
    print(f"cp={cp}, {len(lengths)} documents in {seq} tokens: each rank's share of the unmasked work "
          f"{[round(s, 3) for s in shares]}, max/mean {imbalance:.3f}")
    assert sum(shares) == pytest.approx(1.0)
    assert imbalance < 1.25  # short documents are spread over all 2*cp chunks: no rank holds most of the work
    assert segments_from_eod([1, 0, 2], 0) == [2, 1]

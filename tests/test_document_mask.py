"""data.document_mask / data.reset_position_ids: document layout of a sample, the document
attention kernel, the model on a packed row, the loader's .idx boundaries, config checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.documents import PADDING_DOCUMENT, best_fit_decreasing, document_layout, segments_from_eod
from data_pipeline.indexed_dataset import IndexedDatasetWriter
from data_pipeline.loader import TrainingData
from engine.config import ConfigError
from engine.model.decoder import LlamaModel, init_parameters
from engine.model.document_attention import DocumentSegments, document_attention
from tests.parity import parity_config


def test_layout_eod_is_its_documents_target_and_next_start_is_not_trained():
    # Two documents of 3 and 6 tokens in a seq 8 sample (9 tokens): inputs 0..7, targets 1..8.
    ids, positions, boundary = document_layout([3, 6], 8)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    # Target 2 (doc 0's last token, its EOD) trains; target 3 (doc 1's first) is not predicted from doc 0.
    assert boundary.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


def test_layout_padding_is_its_own_untrained_document():
    ids, positions, boundary = document_layout([4, 2], 8, padded=True)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, PADDING_DOCUMENT, PADDING_DOCUMENT]
    assert boundary.tolist() == [1, 1, 1, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="summing to seq_length"):
        document_layout([4, 2], 8)


def test_segments_from_eod():
    assert segments_from_eod([5, 1, 9, 1, 3], eod_id=9) == [3, 2]
    assert segments_from_eod([9, 4, 4], eod_id=9) == [1, 2]


def test_best_fit_decreasing_fills_tightest_bin():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    # 25 tokens in bins of 8: best fit needs the minimum, 4 bins (7+1, 5+3, 4+3, 2).
    assert len(bins) == 4 and bins[0] == [0, 6]
    with pytest.raises(ValueError, match="item 0 has 9 tokens"):
        best_fit_decreasing([9], 8)


def _dense_reference(q, k, v, ids):
    s = ids.shape[1]
    mask = (ids[:, :, None] == ids[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def test_document_attention_matches_dense_mask_forward_and_backward():
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8, [0, 1, 1, 1, 1, 1, 1, -1]])
    q, k, v = (torch.randn(3, h, 8, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = document_attention(q, k, v, DocumentSegments(ids))
    ref = _dense_reference(q, k, v, ids)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads))
    # Only the diagonal blocks are computed: (6+3+6)/36 of row 0, all of row 1, (1+21+1)/36 of row 2.
    assert DocumentSegments(ids).work_fraction() == pytest.approx((15 + 36 + 23) / 108)


def test_packed_row_gives_each_document_its_unpacked_logits():
    cfg = parity_config([], 1, 1)
    model = LlamaModel(cfg.model)
    init_parameters(model, cfg.seed)
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 128, (1, 12), generator=gen), torch.randint(0, 128, (1, 20), generator=gen)
    packed = torch.cat((a, b), dim=1)
    ids, positions, _ = document_layout([12, 20], 32, padded=True)  # the 32 tokens are all inputs
    with torch.no_grad():
        out = model(packed, positions=positions[None], documents=ids[None])
        alone_a, alone_b = model(a), model(b)
    assert torch.allclose(out[:, :12], alone_a, atol=1e-10)
    assert torch.allclose(out[:, 12:], alone_b, atol=1e-10)
    # Without the mask, the second document sees the first: the test can tell them apart.
    with torch.no_grad():
        assert not torch.allclose(model(packed, positions=positions[None])[:, 12:], alone_b, atol=1e-4)


def test_loader_documents_follow_the_idx(tmp_path):
    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(40):  # every document ends with EOD 256, so EOD positions must agree with the .idx
            writer.add_document(np.append(rng.integers(0, 100, int(rng.integers(2, 20))), 256))
    kwargs = dict(seq_length=32, seed=5, global_batch_size=4, micro_batch_size=2, steps=4, cache_dir=str(tmp_path / "c"))
    plain = TrainingData([prefix], **kwargs).microbatch(1, 0, 0, 1)
    masked = TrainingData([prefix], document_mask=True, reset_position_ids=True, **kwargs).microbatch(1, 0, 0, 1)
    assert plain.document_ids is None and plain.positions is None and plain.loss_mask is None
    assert torch.equal(plain.tokens, masked.tokens)
    for row in range(2):
        tokens = masked.tokens[row].tolist()
        ids, positions, boundary = document_layout(segments_from_eod(tokens, 256), 32)
        assert torch.equal(masked.document_ids[row], ids) and torch.equal(masked.positions[row], positions)
        assert torch.equal(masked.loss_mask[row], boundary)
        assert int(masked.document_ids[row].max()) >= 1  # short documents: the sample spans several
        # Every untrained target is a document's first token, right after an EOD input.
        starts = [t for t in range(32) if masked.loss_mask[row, t] == 0]
        assert all(tokens[t] == 256 for t in starts)


def test_config_checks():
    assert parity_config(["data.document_mask=true", "parallel.cp=2"], 2, 1).data.document_mask  # ring masks
    with pytest.raises(ConfigError, match="data.reset_position_ids=3: expected true or false"):
        parity_config(["data.reset_position_ids=3"], 1, 1)
    assert parity_config(["data.document_mask=true", "data.reset_position_ids=true"], 1, 1).data.document_mask

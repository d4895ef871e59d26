"""csrc/helpers.cpp: output-identical to megatron-core's compiled helpers_cpp."""
import warnings

import numpy as np
import pytest

from data_pipeline import _helpers

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers_cpp as megatron_helpers


@pytest.mark.parametrize("width", ["int32", "int64"])
@pytest.mark.parametrize("seq_length", [2, 7, 64, 257])
def test_sample_index_matches_megatron_for_random_documents(width, seq_length):
    rng = np.random.default_rng(seq_length)
    name = f"build_sample_idx_{width}"
    for _ in range(40):
        num_docs = int(rng.integers(1, 60))
        sizes = rng.integers(1, 400, num_docs).astype(np.int32)
        epochs = int(rng.integers(1, 4))
        document_index = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
        rng.shuffle(document_index)
        tokens_per_epoch = int(sizes.sum())
        if tokens_per_epoch < 2:
            continue
        for drop_last in (True, False):
            for extra in (1, 0):
                ours = getattr(_helpers, name)(sizes, document_index, seq_length, epochs, tokens_per_epoch, drop_last, extra)
                theirs = getattr(megatron_helpers, name)(sizes, document_index, seq_length, epochs, tokens_per_epoch,
                                                         drop_last, extra)
                assert ours.dtype == theirs.dtype == np.dtype(width)
                np.testing.assert_array_equal(ours, theirs)


def test_sample_index_rejects_out_of_range_document_ids():
    with pytest.raises(IndexError):
        _helpers.build_sample_idx_int32(np.array([5, 5], np.int32), np.array([0, 7], np.int32), 3, 1, 10, True, 1)


def test_blending_indices_match_megatron():
    rng = np.random.default_rng(0)
    for num_datasets in (1, 2, 3, 7):
        for size in (1, 10, 1000, 12345):
            weights = rng.random(num_datasets)
            weights /= weights.sum()
            ours = (np.zeros(size, np.int16), np.zeros(size, np.int64))
            theirs = (np.zeros(size, np.int16), np.zeros(size, np.int64))
            _helpers.build_blending_indices(*ours, weights, num_datasets, size, False)
            megatron_helpers.build_blending_indices(*theirs, weights, num_datasets, size, False)
            np.testing.assert_array_equal(ours[0], theirs[0])
            np.testing.assert_array_equal(ours[1], theirs[1])


def test_blending_from_cursors_keeps_the_phase_mix_and_continues_sample_ids():
    weights = np.array([0.25, 0.75])
    plain = (np.zeros(100, np.int16), np.zeros(100, np.int64))
    _helpers.build_blending_indices(*plain, weights, 2, 100, False)
    cursors = np.array([1000, 3], dtype=np.int64)  # e.g. an earlier phase drew mostly dataset 0
    dataset_index, sample_index = np.zeros(100, np.int16), np.zeros(100, np.int64)
    _helpers.build_blending_indices_from(dataset_index, sample_index, weights, cursors)
    # The interleave depends only on this phase's weights: the earlier phase does not skew it ...
    np.testing.assert_array_equal(dataset_index, plain[0])
    # ... while every dataset's sample ids continue from its cursor with no gap or repeat ...
    np.testing.assert_array_equal(sample_index, plain[1] + np.where(plain[0] == 0, 1000, 3))
    # ... and the cursors come back advanced by what was drawn.
    assert cursors.tolist() == [1000 + int((plain[0] == 0).sum()), 3 + int((plain[0] == 1).sum())]


def test_phase_blending_never_draws_a_zero_weight_dataset_unlike_megatrons_position_1_tie():
    weights = np.array([0.0, 1.0])
    theirs = (np.zeros(10, np.int16), np.zeros(10, np.int64))
    megatron_helpers.build_blending_indices(*theirs, weights, 2, 10, False)
    assert theirs[0][1] == 0  # max(i, 1) gives positions 0 and 1 one target; the tie picks dataset 0
    ours = (np.zeros(10, np.int16), np.zeros(10, np.int64))
    _helpers.build_blending_indices_from(*ours, weights, np.zeros(2, np.int64))
    assert (ours[0] == 1).all() and ours[1].tolist() == list(range(10))

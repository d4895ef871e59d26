"""gpt_dataset / blending: sample-for-sample identical to megatron-core's GPTDataset and
BlendedDataset built on the same .bin/.idx, seed, split and sequence length."""
import os
import warnings

import numpy as np
import pytest

from data_pipeline.gpt_dataset import GPTDataset
from data_pipeline.indexed_dataset import IndexedDatasetWriter
from data_pipeline.loader import TrainingData

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig


class _ByteTokenizerStub:
    """What GPTDatasetConfig reads from a tokenizer (vocab size, eod, pad, cache identity)."""

    vocab_size, eod, pad = 258, 256, 257
    unique_identifiers = {"class": "ByteTokenizerStub"}


def _write(prefix, seed, documents=60, max_len=300):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            writer.add_document(np.append(rng.integers(0, 256, int(rng.integers(1, max_len))), 256))
    return prefix


def _megatron(prefixes, weights, seq_length, seed, num_samples, cache, split="1,0,0"):
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
                              tokenizer=_ByteTokenizerStub(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=cache, mmap_bin_files=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _, _ = BlendedMegatronDatasetBuilder(MegatronGPTDataset, [num_samples, 0, 0], lambda: True,
                                                    config).build()
    return train


# (seq_length, num_samples): one epoch; many epochs with a nearly full last epoch (shuffled
# with the others); many epochs with a short last epoch (shuffled separately).
CASES = [(32, 50), (16, 4000), (64, 560), (128, 300)]


@pytest.mark.parametrize("seq_length,num_samples", CASES)
def test_gpt_dataset_matches_megatron_sample_for_sample(tmp_path, seq_length, num_samples):
    prefix = _write(str(tmp_path / "d"), seed=seq_length)
    theirs = _megatron([prefix], None, seq_length, 1234, num_samples, str(tmp_path / "mcache"))
    ours = GPTDataset(prefix, seq_length, num_samples, 1234, cache_dir=str(tmp_path / "cache"))
    assert len(ours) == len(theirs) >= num_samples
    np.testing.assert_array_equal(ours.document_index, theirs.document_index)
    np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
    np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs._query_document_sample_shuffle_indices(i)[0])


def test_split_takes_megatron_train_documents(tmp_path):
    prefix = _write(str(tmp_path / "d"), seed=3, documents=101)
    theirs = _megatron([prefix], None, 32, 9, 200, str(tmp_path / "mcache"), split="90,7,3")
    ours = GPTDataset(prefix, 32, 200, 9, split="90,7,3")
    assert len(ours) == len(theirs)
    assert ours.document_index.max() == theirs.document_index.max() < 100
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs._query_document_sample_shuffle_indices(i)[0])


def test_indices_are_cached_by_a_hash_of_their_inputs(tmp_path):
    prefix = _write(str(tmp_path / "d"), seed=1)
    cache = tmp_path / "cache"
    first = GPTDataset(prefix, 32, 500, 7, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and any(name.endswith("shuffle_index.npy") for name in files)
    again = GPTDataset(prefix, 32, 500, 7, cache_dir=str(cache))
    assert isinstance(again.shuffle_index, np.memmap)  # loaded from disk, not rebuilt
    np.testing.assert_array_equal(first[17], again[17])
    GPTDataset(prefix, 32, 500, 8, cache_dir=str(cache))  # another seed: another key
    assert len(os.listdir(cache)) == 8


def test_training_data_matches_megatron_blended_dataset(tmp_path):
    prefixes = [_write(str(tmp_path / f"d{i}"), seed=10 + i, documents=40 + 20 * i) for i in range(3)]
    weights, gbs, steps, seq_length = [0.5, 0.3, 0.2], 8, 40, 24
    # No cache path: megatron-core's BlendedDataset cache needs torch.distributed initialized.
    theirs = _megatron(prefixes, weights, seq_length, 42, steps * gbs, None)
    ours = TrainingData(prefixes, seq_length, 42, gbs, 2, steps, cache_dir=str(tmp_path / "cache"), weights=weights)
    np.testing.assert_array_equal(ours.dataset_index[:steps * gbs], theirs.dataset_index[:steps * gbs])
    for dataset_ours, dataset_theirs in zip(ours.datasets, theirs.datasets):
        assert dataset_ours.description and len(dataset_ours) == len(dataset_theirs)
    for step in range(steps):
        batch = np.concatenate([ours.microbatch(step, j, 0, 1).tokens.numpy() for j in range(4)])
        for row in range(gbs):
            position = step * gbs + row
            dataset = theirs.datasets[theirs.dataset_index[position]]
            expected = dataset._query_document_sample_shuffle_indices(int(theirs.dataset_sample_index[position]))[0]
            np.testing.assert_array_equal(batch[row], expected)


def test_training_data_single_dataset_matches_megatron_sampler_order(tmp_path):
    prefix = _write(str(tmp_path / "d"), seed=5)
    gbs, mbs, dp, steps = 8, 2, 2, 30
    theirs = _megatron([prefix], None, 16, 3, steps * gbs, str(tmp_path / "mcache"))
    ours = TrainingData([prefix], 16, 3, gbs, mbs, steps, data_parallel_size=dp)
    assert ours.num_microbatches == 2
    for step in (0, 1, 17, 29):
        for j in range(2):
            for rank in range(dp):
                # Megatron's MegatronPretrainingSampler: rank r of a dp*mbs slice takes [r*mbs, (r+1)*mbs).
                first = step * gbs + j * mbs * dp + rank * mbs
                expected = [theirs._query_document_sample_shuffle_indices(first + k)[0] for k in range(mbs)]
                np.testing.assert_array_equal(ours.microbatch(step, j, rank, dp).tokens.numpy(), np.stack(expected))

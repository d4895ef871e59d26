"""loader: the sample of (step, microbatch, dp rank) is a pure function; resume, dp, skips,
phase schedules and the prefetching iterator."""
import threading

import numpy as np
import pytest
import torch

from data_pipeline import DataError
from data_pipeline.indexed_dataset import IndexedDatasetWriter
from data_pipeline.loader import TrainingData, data_batch_index


def _write(prefix, seed, documents=50, offset=0):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            writer.add_document(np.append(rng.integers(offset, offset + 100, int(rng.integers(5, 200))), 256))
    return prefix


@pytest.fixture
def two_datasets(tmp_path):
    # Dataset 0 uses token ids 0..99, dataset 1 ids 100..199: a sample's tokens tell its source.
    return [_write(str(tmp_path / "a"), 1), _write(str(tmp_path / "b"), 2, offset=100)]


def _data(prefixes, tmp_path, **overrides):
    kwargs = dict(seq_length=16, seed=5, global_batch_size=8, micro_batch_size=2, steps=20,
                  cache_dir=str(tmp_path / "cache"), weights=[0.6, 0.4])
    kwargs.update(overrides)
    return TrainingData(prefixes, **kwargs)


def _global_batch(data, step, dp, skip_steps=()):
    """The step's samples in global order, gathered from every rank's microbatches."""
    rows = []
    for j in range(data.global_batch_size // (data.micro_batch_size * dp)):
        for rank in range(dp):
            rows.append(data.microbatch(step, j, rank, dp, skip_steps).tokens)
    return torch.cat(rows)


def test_microbatch_shape_and_purity(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path)
    first = data.microbatch(7, 1, 1, 2).tokens
    assert first.shape == (2, 17) and first.dtype == torch.int64
    fresh = _data(two_datasets, tmp_path)  # a restarted process: same config, no shared state
    assert torch.equal(fresh.microbatch(7, 1, 1, 2).tokens, first)


def test_resume_at_step_k_yields_what_an_uninterrupted_run_would(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path)
    with data.iterate(0, dp_rank=0, dp_size=2) as uninterrupted:
        reference = {step: batches for step, batches in uninterrupted}
    assert sorted(reference) == list(range(20))
    with _data(two_datasets, tmp_path).iterate(12, dp_rank=0, dp_size=2) as resumed:
        for step, batches in resumed:
            assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(batches, reference[step]))


def test_dp_size_partitions_samples_differently_but_keeps_each_steps_global_batch(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path)
    for step in (0, 5, 19):
        batches = {dp: _global_batch(data, step, dp) for dp in (1, 2, 4)}
        assert torch.equal(batches[1], batches[2]) and torch.equal(batches[1], batches[4])
    # ... while a given (microbatch, rank) maps to different samples: j*(mbs*dp) + r*mbs.
    assert torch.equal(data.microbatch(3, 1, 0, 1).tokens, _global_batch(data, 3, 1)[2:4])
    assert torch.equal(data.microbatch(3, 1, 0, 2).tokens, _global_batch(data, 3, 1)[4:6])
    assert torch.equal(data.microbatch(3, 0, 1, 4).tokens, _global_batch(data, 3, 1)[2:4])
    assert not torch.equal(data.microbatch(3, 1, 0, 1).tokens, data.microbatch(3, 1, 0, 2).tokens)


def test_skipped_batches_are_never_trained_on(two_datasets, tmp_path):
    assert [data_batch_index(s, [3, 5]) for s in range(6)] == [0, 1, 2, 4, 6, 7]
    assert [data_batch_index(s, [0, 1]) for s in range(2)] == [2, 3]
    data = _data(two_datasets, tmp_path)
    # After a rewind that skips batch 3, step 3 trains on batch 4, step 4 on batch 5, ...
    for step in range(3):
        assert torch.equal(_global_batch(data, step, 1, [3]), _global_batch(data, step, 1))
    for step in range(3, 10):
        assert torch.equal(_global_batch(data, step, 1, [3]), _global_batch(data, step + 1, 1))


def test_weights_set_the_mix(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path, weights=[0.75, 0.25])
    sources = [int(data.sample(p)[0] >= 100) for p in range(160)]
    assert sources.count(0) == 120 and sources.count(1) == 40


def test_phase_schedule_changes_the_mix_without_replaying_samples(two_datasets, tmp_path):
    phases = [{"start_step": 5, "weights": [0.0, 1.0]}, {"start_step": 10, "weights": [1, 1]}]
    data = _data(two_datasets, tmp_path, phases=phases)
    gbs = data.global_batch_size
    index = np.asarray(data.dataset_index)
    assert (index[:5 * gbs] == 0).sum() == round(0.6 * 5 * gbs)
    assert (index[5 * gbs:10 * gbs] == 1).all()
    assert (index[10 * gbs:20 * gbs] == 0).sum() == 5 * gbs
    for dataset in (0, 1):  # every dataset's samples are drawn in order, each exactly once
        drawn = np.asarray(data.dataset_sample_index)[index == dataset]
        np.testing.assert_array_equal(drawn, np.arange(len(drawn)))
    assert ((_global_batch(data, 7, 2) >= 100) | (_global_batch(data, 7, 2) == 256)).all()  # only dataset 1


def test_bad_schedules_name_the_field(two_datasets, tmp_path):
    with pytest.raises(DataError, match=r"data.phases\[1\].start_step=3: start steps must increase"):
        _data(two_datasets, tmp_path, phases=[{"start_step": 5, "weights": [1, 1]}, {"start_step": 3, "weights": [1, 1]}])
    with pytest.raises(DataError, match=r"data.phases\[0\].weights=\[1\]: needs 2 weights"):
        _data(two_datasets, tmp_path, phases=[{"start_step": 5, "weights": [1]}])
    with pytest.raises(DataError, match=r"data.weights=\[0.0, 0.0\]: weights must be finite, >= 0, with a positive sum"):
        _data(two_datasets, tmp_path, weights=[0.0, 0.0])
    with pytest.raises(DataError, match="train.global_batch_size=8: must be a multiple of"):
        _data(two_datasets, tmp_path).microbatch(0, 0, 0, 3)


def test_steps_beyond_the_built_range_raise_a_clear_error(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path, reserve_steps=2)
    data.microbatch(21, 0, 0, 1).tokens  # reserve covers two skipped batches
    with pytest.raises(DataError, match="beyond the 22 batches built .*increase train.steps"):
        data.microbatch(22, 0, 0, 1).tokens


def test_prefetch_iterator_matches_direct_calls_and_shuts_down(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path, prefetch=3)
    assert data.num_microbatches == 4
    iterator = data.iterate(2, dp_rank=1, dp_size=2, skip_steps=[4])
    step, batches = next(iterator)
    assert step == 2 and len(batches) == 2
    assert all(torch.equal(b.tokens, data.microbatch(2, j, 1, 2, [4]).tokens) for j, b in enumerate(batches))
    step, batches = next(iterator)
    assert all(torch.equal(b.tokens, data.microbatch(3, j, 1, 2, [4]).tokens) for j, b in enumerate(batches))
    iterator.close()  # mid-run, with a full queue
    assert not iterator._thread.is_alive()
    with pytest.raises(StopIteration):
        next(iterator)
    assert not any(t.name == "apogee-data-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_iterator_propagates_worker_exceptions(two_datasets, tmp_path):
    data = _data(two_datasets, tmp_path, reserve_steps=0)
    with data.iterate(18, 0, 1, end_step=25) as iterator:
        assert [next(iterator)[0], next(iterator)[0]] == [18, 19]
        with pytest.raises(DataError, match="beyond the 20 batches built"):
            next(iterator)

"""indexed_dataset: .bin/.idx byte-compatible both ways with megatron-core (the oracle)."""
import warnings

import numpy as np
import pytest
import torch

from data_pipeline import DataError
from data_pipeline.indexed_dataset import IndexedDatasetReader, IndexedDatasetWriter, dtype_for_vocab

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def _documents(dtype, count=40, seed=0):
    rng = np.random.default_rng(seed)
    high = 65535 if dtype == np.uint16 else 2**31 - 1
    return [rng.integers(0, high, size=int(rng.integers(0, 300)), dtype=np.int64) for _ in range(count)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_apogee_written_files_read_identically_with_megatron(tmp_path, dtype):
    documents = _documents(dtype)
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
    theirs = IndexedDataset(prefix)
    assert theirs.index.dtype == dtype and len(theirs) == len(documents)
    assert list(theirs.document_indices) == list(range(len(documents) + 1))
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(theirs[i], document.astype(dtype))
        if len(document) > 5:
            np.testing.assert_array_equal(theirs.get(i, offset=2, length=3), document[2:5])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_written_files_read_identically_and_byte_equal(tmp_path, dtype):
    documents = _documents(dtype, seed=1)
    prefix = str(tmp_path / "theirs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_item(torch.from_numpy(document))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDatasetReader(prefix)
    assert ours.dtype == dtype and len(ours) == len(documents) and ours.num_documents == len(documents)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(ours[i], document.astype(dtype))
        np.testing.assert_array_equal(ours.document(i), document.astype(dtype))
    # Our writer produces the very same bytes for the same documents.
    with IndexedDatasetWriter(str(tmp_path / "ours"), dtype) as writer:
        for document in documents:
            writer.add_document(document)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()


def test_reader_handles_multi_sequence_documents_from_megatron(tmp_path):
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), lengths=[2, 3])
    builder.add_document(torch.tensor([9, 8]), lengths=[2])
    builder.finalize(prefix + ".idx")
    ours = IndexedDatasetReader(prefix)
    assert len(ours) == 3 and list(ours.document_indices) == [0, 2, 3]
    assert ours[1].tolist() == [3, 4, 5]
    assert ours.document(0).tolist() == [1, 2, 3, 4, 5]


def test_get_returns_zero_copy_read_only_views(tmp_path):
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.arange(100))
        writer.add_document(np.arange(50))
    reader = IndexedDatasetReader(prefix)
    first, second = reader.get(0, 10, 5), reader.get(1)
    assert first.tolist() == [10, 11, 12, 13, 14] and len(second) == 50
    assert not first.flags.writeable and not first.flags.owndata
    assert np.shares_memory(first, reader.get(0))


def test_token_that_does_not_fit_dtype_is_rejected_and_writer_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "bad")
    with pytest.raises(DataError, match=r"token id 70000 does not fit dtype uint16 \(valid ids 0\.\.65535\)"):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            writer.add_document([70000], source="doc.txt:7")
    assert list(tmp_path.iterdir()) == []


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing file .*nothere.idx"):
        IndexedDatasetReader(str(tmp_path / "nothere"))
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, but long enough to parse")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(DataError, match="junk.idx: not a Megatron index file"):
        IndexedDatasetReader(str(tmp_path / "junk"))
    prefix = str(tmp_path / "cut")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.arange(100))
    (tmp_path / "cut.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="cut.bin: 10 bytes, but the index describes 200"):
        IndexedDatasetReader(prefix)


def test_dtype_rule_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (258, 50257, 65499, 65500, 128256):
        assert dtype_for_vocab(vocab) == DType.optimal_dtype(vocab)

"""token_range: a dataset's token ids checked against the model's vocabulary, scanned once per .bin."""
import json
import os
import re

import numpy as np
import pytest

from data_pipeline import DataError, token_range
from data_pipeline.indexed_dataset import IndexedDatasetWriter
from data_pipeline.token_range import cache_file, check_token_ids, max_token_id, token_id_range


def _write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for document in documents:
            writer.add_document(np.asarray(document, dtype=np.int64))
    return str(prefix)


def _documents(seed, high, count=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 200))) for _ in range(count)]


@pytest.fixture
def scans(monkeypatch):
    """Counts the full scans of a .bin (the cache must make repeated calls read none)."""
    calls = []
    real = token_range.scan_token_range

    def counting(prefix):
        calls.append(prefix)
        return real(prefix)

    monkeypatch.setattr(token_range, "scan_token_range", counting)
    return calls


def test_out_of_range_id_names_the_file_the_id_and_the_vocabulary(tmp_path):
    documents = _documents(0, 258) + [[5, 300, 7]]
    prefix = _write(tmp_path / "ds", documents)
    expected = f"{prefix}.bin: token id 300 >= model.vocab_size=258 (valid ids 0..257)"
    with pytest.raises(DataError, match=re.escape(expected)):
        check_token_ids(prefix, 258, str(tmp_path / "cache"), option="model.vocab_size")
    with pytest.raises(DataError, match=r"token id 300 >= model.vocab_size=300"):  # the limit is exclusive
        check_token_ids(prefix, 300, str(tmp_path / "cache"), option="model.vocab_size")
    check_token_ids(prefix, 301, str(tmp_path / "cache"))  # every id < 301: no error


def test_max_token_id_is_the_largest_id_in_the_bin(tmp_path, monkeypatch):
    documents = _documents(1, 60000)
    prefix = _write(tmp_path / "ds", documents)
    everything = np.concatenate(documents)
    assert max_token_id(prefix) == int(everything.max())
    monkeypatch.setattr(token_range, "SCAN_CHUNK_TOKENS", 7)  # many chunks: the reduction spans them
    assert token_id_range(prefix) == (int(everything.min()), int(everything.max()))


def test_second_call_reads_the_cache_not_the_bin(tmp_path, scans):
    documents = _documents(2, 258)
    prefix = _write(tmp_path / "ds", documents)
    cache = str(tmp_path / "cache")
    first = max_token_id(prefix, cache)
    assert first == int(np.concatenate(documents).max()) and len(scans) == 1
    entry = json.loads(open(cache_file(prefix, cache)).read())
    assert entry["range"][1] == first and entry["key"]["prefix"] == os.path.abspath(prefix)
    assert max_token_id(prefix, cache) == first
    check_token_ids(prefix, 258, cache)
    assert len(scans) == 1  # neither the second lookup nor the check rescanned


def test_a_rewritten_bin_is_scanned_again(tmp_path, scans):
    cache = str(tmp_path / "cache")
    prefix = _write(tmp_path / "ds", [[1, 2, 3]])
    assert max_token_id(prefix, cache) == 3
    _write(tmp_path / "ds", [[1, 2, 3], [9, 400]])
    assert max_token_id(prefix, cache) == 400 and len(scans) == 2


def test_a_damaged_cache_entry_is_scanned_again(tmp_path, scans):
    cache = str(tmp_path / "cache")
    prefix = _write(tmp_path / "ds", [[4, 8, 15]])
    assert max_token_id(prefix, cache) == 15
    with open(cache_file(prefix, cache), "w") as handle:
        handle.write("{not json")
    assert max_token_id(prefix, cache) == 15 and len(scans) == 2


def test_negative_ids_are_refused(tmp_path):
    prefix = _write(tmp_path / "ds", [[3, -2, 5]], dtype=np.int32)
    with pytest.raises(DataError, match=r"ds.bin: token id -2 is negative \(valid ids 0..99\)"):
        check_token_ids(prefix, 100)


def test_a_dataset_without_tokens_passes(tmp_path):
    prefix = _write(tmp_path / "ds", [])
    assert max_token_id(prefix, str(tmp_path / "cache")) is None
    check_token_ids(prefix, 1, str(tmp_path / "cache"))

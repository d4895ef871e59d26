"""corpus: the stdlib corpus and preprocess-once caching that is safe under concurrent ranks."""
import multiprocessing
import os
import re
import sysconfig

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.corpus import ensure_corpus
from data_pipeline.named_inputs import stdlib_files
from data_pipeline.indexed_dataset import IndexedDatasetReader


def test_stdlib_corpus_is_the_interpreters_own_sources():
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    assert len(files) > 100 and files == stdlib_files()  # deterministic order
    assert all(f.startswith(root) and f.endswith(".py") for f in files)
    assert not any(f"{os.sep}site-packages{os.sep}" in f or f"{os.sep}test{os.sep}" in f for f in files)
    assert os.path.join(root, "os.py") in files


def test_ensure_corpus_preprocesses_stdlib_once_and_reuses_it(tmp_path, capsys):
    prefix = ensure_corpus("stdlib", str(tmp_path))
    reader = IndexedDatasetReader(prefix)
    assert reader.dtype == np.uint16 and reader.num_documents > 100
    assert (np.asarray(reader.sequence_lengths) > 1).all()
    assert "preprocess:" in capsys.readouterr().out
    assert ensure_corpus("stdlib", str(tmp_path)) == prefix
    assert "preprocess:" not in capsys.readouterr().out  # cache hit: nothing rebuilt
    assert ensure_corpus(prefix, str(tmp_path / "elsewhere")) == prefix  # an existing prefix passes through


def _race(spec, cache_dir, results):
    results.put(ensure_corpus(spec, cache_dir))


def test_concurrent_ranks_get_one_dataset(tmp_path):
    (tmp_path / "raw").mkdir()
    for i in range(30):
        (tmp_path / "raw" / f"{i:02d}.txt").write_text(f"document number {i}\n" * (i + 1))
    context = multiprocessing.get_context("spawn")  # as ranks start: a fork of this threaded process can inherit a held lock
    results = context.Queue()
    ranks = [context.Process(target=_race, args=(str(tmp_path / "raw"), str(tmp_path / "cache"), results))
             for _ in range(4)]
    for rank in ranks:
        rank.start()
    prefixes = [results.get(timeout=60) for _ in ranks]
    for rank in ranks:
        rank.join(timeout=60)
        assert rank.exitcode == 0
    assert len(set(prefixes)) == 1
    assert IndexedDatasetReader(prefixes[0]).num_documents == 30
    names = sorted(os.listdir(tmp_path / "cache"))
    assert [n for n in names if "tmp" in n] == [] and len([n for n in names if n.endswith(".bin")]) == 1


def test_changed_inputs_get_a_new_cache_entry(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = ensure_corpus(str(tmp_path / "a.txt"), str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("one and more")
    second = ensure_corpus(str(tmp_path / "a.txt"), str(tmp_path / "cache"))
    assert first != second and len(IndexedDatasetReader(second)[0]) == len("one and more") + 1


def test_unknown_input_is_rejected(tmp_path):
    with pytest.raises(DataError, match=r"data input 'nowhere': neither a dataset prefix .* or \['stdlib'\]"):
        ensure_corpus("nowhere", str(tmp_path))


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_dataset_file_instead_of_its_prefix_asks_for_the_prefix(tmp_path, suffix):
    (tmp_path / "a.txt").write_text("some text")
    prefix = ensure_corpus(str(tmp_path / "a.txt"), str(tmp_path / "cache"))
    before = sorted(os.listdir(tmp_path / "cache"))
    expected = rf"data input {re.escape(repr(prefix + suffix))}: .* did you mean {re.escape(repr(prefix))}\?"
    with pytest.raises(DataError, match=expected):
        ensure_corpus(prefix + suffix, str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path / "cache")) == before  # nothing was preprocessed from the .bin's bytes

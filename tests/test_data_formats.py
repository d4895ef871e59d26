"""preprocess reads corpora as people keep them: JSONL (.gz, .zst), Parquet, Arrow, `datasets` save_to_disk.

The same documents give byte-identical .bin/.idx whatever format held them; a bad record is
named by file and line (JSONL) or file and row (Parquet, Arrow).
"""
import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import DataError
from data_pipeline.indexed_dataset import IndexedDatasetReader
from data_pipeline.preprocess import preprocess

# Unicode, an empty document (skipped in every format), newlines and a long one.
DOCUMENTS = [f"document {i}: " + "word " * (i % 13) for i in range(150)] + [
    "zweite Zeile ü, 日本語, emoji \U0001F680", "", "two\nlines\n", "x" * 5000]


def _jsonl_bytes(documents=DOCUMENTS):
    return "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(documents)).encode()


def _write_formats(directory):
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst (two frames), Parquet, Arrow, save_to_disk."""
    import datasets

    raw = _jsonl_bytes()
    paths = {"jsonl": directory / "c.jsonl", "jsonl.gz": directory / "c.jsonl.gz",
             "jsonl.zst": directory / "c.jsonl.zst", "parquet": directory / "c.parquet",
             "arrow": directory / "c.arrow", "save_to_disk": directory / "saved"}
    paths["jsonl"].write_bytes(raw)
    paths["jsonl.gz"].write_bytes(gzip.compress(raw))
    half = len(raw) // 2
    compressor = zstandard.ZstdCompressor()
    paths["jsonl.zst"].write_bytes(compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    table = pa.table({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS})
    pq.write_table(table, paths["parquet"], row_group_size=40)  # several row groups
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=25)  # the IPC file format, several batches
    # Three shards: their order is the order state.json lists them, not the directory's.
    datasets.Dataset.from_dict({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS}).save_to_disk(
        str(paths["save_to_disk"]), num_shards=3)
    return {name: str(path) for name, path in paths.items()}


def _bytes_of(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_every_format_gives_the_jsonl_paths_bytes(tmp_path):
    paths = _write_formats(tmp_path)
    preprocess([paths["jsonl"]], str(tmp_path / "out-jsonl"), workers=1, progress=False)
    expected = _bytes_of(str(tmp_path / "out-jsonl"))
    reader = IndexedDatasetReader(str(tmp_path / "out-jsonl"))
    assert len(reader) == len(DOCUMENTS) - 1  # the empty document is skipped
    assert reader[len(reader) - 1].tolist() == list(DOCUMENTS[-1].encode()) + [256]
    for name, path in paths.items():
        for workers in (1, 2):
            prefix = str(tmp_path / f"out-{name}-{workers}")
            summary = preprocess([path], prefix, workers=workers, progress=False)
            assert _bytes_of(prefix) == expected, (name, workers)
            assert summary["documents"] == len(DOCUMENTS) - 1


def test_a_directory_walk_takes_parquet_compressed_jsonl_and_saved_datasets(tmp_path):
    import datasets

    (tmp_path / "tree" / "z_saved").mkdir(parents=True)
    first, second, third = DOCUMENTS[:50], DOCUMENTS[50:100], DOCUMENTS[100:]
    # A directory's own files (sorted) come before its sub-directories, as the walk has always read them.
    pq.write_table(pa.table({"text": first}), tmp_path / "tree" / "a.parquet")
    (tmp_path / "tree" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(second)))
    datasets.Dataset.from_dict({"text": third}).save_to_disk(str(tmp_path / "tree" / "z_saved"))
    (tmp_path / "tree" / "loose.arrow").write_bytes(b"not walked: loose .arrow files are often caches")
    (tmp_path / "all.jsonl").write_bytes(_jsonl_bytes())
    preprocess([str(tmp_path / "tree")], str(tmp_path / "walked"), workers=1, progress=False)
    preprocess([str(tmp_path / "all.jsonl")], str(tmp_path / "plain"), workers=1, progress=False)
    assert _bytes_of(str(tmp_path / "walked")) == _bytes_of(str(tmp_path / "plain"))


def _assert_fails_cleanly(tmp_path, match, inputs, **kwargs):
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        preprocess(inputs, str(out_dir / "ds"), progress=False, **kwargs)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_a_missing_parquet_column_names_the_file_and_the_columns(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), tmp_path / "d.parquet")
    _assert_fails_cleanly(tmp_path, r"d.parquet:row 0: no column 'text' \(found \['body', 'id'\]\); set --json-key",
                          [str(tmp_path / "d.parquet")], workers=1)
    preprocess([str(tmp_path / "d.parquet")], str(tmp_path / "ok"), json_key="body", workers=1, progress=False)
    assert IndexedDatasetReader(str(tmp_path / "ok"))[1].tolist() == [ord("b"), 256]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_null_text_names_the_file_and_the_row(tmp_path, workers):
    texts = [f"doc {i}" for i in range(300)]
    texts[257] = None  # past the first batches: the error names the row, not the batch
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=100)
    _assert_fails_cleanly(tmp_path, r"d.parquet:row 257: column 'text' is null, expected a string",
                          [str(tmp_path / "d.parquet")], workers=workers)


def test_a_non_string_column_names_its_type(tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "d.parquet")
    _assert_fails_cleanly(tmp_path, r"d.parquet:row 0: column 'text' holds int64, expected a string",
                          [str(tmp_path / "d.parquet")], workers=1)


def test_a_token_that_does_not_fit_names_the_row(tmp_path):
    pq.write_table(pa.table({"text": ["fine", "also fine"]}), tmp_path / "d.parquet")
    _assert_fails_cleanly(tmp_path, r"d.parquet:row 0: token id 256 does not fit dtype uint8",
                          [str(tmp_path / "d.parquet")], workers=1, dtype="uint8")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_line_in_compressed_jsonl_names_file_and_line(tmp_path, workers):
    raw = _jsonl_bytes(DOCUMENTS[:120]) + b"{broken\n"
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    _assert_fails_cleanly(tmp_path, r"d.jsonl.gz:121: invalid JSON", [str(tmp_path / "d.jsonl.gz")], workers=workers)


@pytest.mark.parametrize("suffix, compress", [(".jsonl.gz", gzip.compress),
                                              (".jsonl.zst", zstandard.ZstdCompressor().compress)])
def test_a_truncated_compressed_file_is_named(tmp_path, suffix, compress):
    data = compress(_jsonl_bytes(DOCUMENTS * 20))
    (tmp_path / f"d{suffix}").write_bytes(data[:len(data) // 2])
    _assert_fails_cleanly(tmp_path, rf"d{re.escape(suffix)}:\d+: cannot decompress .* truncated",
                          [str(tmp_path / f"d{suffix}")], workers=1)


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    _assert_fails_cleanly(tmp_path, r"dd: a `datasets` DatasetDict with splits \['test', 'train'\]; give the "
                                    r"directory of the split to read, e.g. .*dd/train", [str(tmp_path / "dd")],
                          workers=1)
    preprocess([str(tmp_path / "dd" / "train")], str(tmp_path / "train"), workers=1, progress=False)
    assert len(IndexedDatasetReader(str(tmp_path / "train"))) == 2


def test_a_state_json_pointing_outside_its_directory_is_refused(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "saved"))
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere.arrow"}]
    (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
    _assert_fails_cleanly(tmp_path, r"state.json: '_data_files' is .*elsewhere.arrow.*expected a list",
                          [str(tmp_path / "saved")], workers=1)

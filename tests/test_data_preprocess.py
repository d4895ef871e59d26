"""preprocess: text/jsonl/directories -> .bin/.idx; clear errors that leave nothing behind."""
import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import DataError
from data_pipeline.indexed_dataset import IndexedDatasetReader
from cli.preprocess import add_cli_arguments, run_cli
from data_pipeline.preprocess import preprocess


def _corpus(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "zweite Zeile ü"}) + "\n")
    (tmp_path / "in" / "sub" / "empty.txt").write_text("")
    (tmp_path / "in" / "image.bin").write_bytes(b"\xff\xfe")  # not a text suffix: ignored in directories
    return tmp_path / "in"


def test_directory_of_txt_and_jsonl_becomes_documents_with_eod(tmp_path):
    inputs = _corpus(tmp_path)
    summary = preprocess([str(inputs)], str(tmp_path / "out" / "ds"), workers=1, progress=False)
    reader = IndexedDatasetReader(str(tmp_path / "out" / "ds"))
    texts = ["hello world", "first", "zweite Zeile ü"]  # sorted walk: a.txt, then sub/b.jsonl
    assert reader.dtype == np.uint16 and len(reader) == 3
    for i, text in enumerate(texts):
        assert reader[i].tolist() == list(text.encode()) + [256]
    assert summary["documents"] == 3
    assert summary["tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert summary["bytes"] > 0 and summary["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds.bin", "ds.idx"]  # no temporaries


def test_output_does_not_depend_on_worker_count(tmp_path):
    lines = [json.dumps({"body": f"document {i} " * (i % 7 + 1)}) for i in range(500)]
    (tmp_path / "many.jsonl").write_text("\n".join(lines))
    for workers in (1, 2):
        preprocess([str(tmp_path / "many.jsonl")], str(tmp_path / f"w{workers}"), json_key="body",
                   workers=workers, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert len(IndexedDatasetReader(str(tmp_path / "w1"))) == 500


def test_summary_line_is_printed(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc")
    preprocess([str(tmp_path / "a.txt")], str(tmp_path / "o"), workers=1, progress=False)
    out = capsys.readouterr().out
    assert "1 documents, 4 tokens, 3 bytes" in out and "tokens/s" in out


def _assert_fails_cleanly(tmp_path, match, inputs, **kwargs):
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        preprocess(inputs, str(out_dir / "ds"), progress=False, **kwargs)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_missing_path_is_named(tmp_path):
    _assert_fails_cleanly(tmp_path, r"--input .*nope.txt.*no such file or directory.*'stdlib'", [str(tmp_path / "nope.txt")])


@pytest.mark.parametrize("workers", [1, 2])
def test_invalid_json_line_names_file_and_line(tmp_path, workers):
    good = [json.dumps({"text": f"doc {i}"}) for i in range(300)]  # the error comes after many good lines
    (tmp_path / "bad.jsonl").write_text("\n".join(good + ["{broken"]) + "\n")
    _assert_fails_cleanly(tmp_path, r"bad.jsonl:301: invalid JSON", [str(tmp_path / "bad.jsonl")], workers=workers)


def test_json_line_without_the_key_names_file_line_and_keys(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    _assert_fails_cleanly(tmp_path, r"d.jsonl:2: no key 'text' \(found \['content'\]\); set --json-key",
                          [str(tmp_path / "d.jsonl")], workers=1)


def test_empty_corpus_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    _assert_fails_cleanly(tmp_path, "empty corpus", [str(tmp_path / "empty")], workers=1)


def test_unknown_tokenizer_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    _assert_fails_cleanly(tmp_path, r"tokenizer 'gpt9': unknown; valid choices are 'byte'", [str(tmp_path / "a.txt")],
                          tokenizer="gpt9")


def test_token_that_does_not_fit_dtype_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n')
    # EOD (256) does not fit uint8.
    _assert_fails_cleanly(tmp_path, r"d.jsonl:1: token id 256 does not fit dtype uint8 \(valid ids 0..255\)",
                          [str(tmp_path / "d.jsonl")], workers=1, dtype="uint8")


def test_non_utf8_text_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _assert_fails_cleanly(tmp_path, r"latin1.txt: not valid UTF-8 at byte 3", [str(tmp_path / "latin1.txt")], workers=1)


def test_run_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    (tmp_path / "a.txt").write_text("abc")
    ok = parser.parse_args(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "o"), "--workers", "1"])
    assert run_cli(ok) == 0 and IndexedDatasetReader(str(tmp_path / "o"))[0].tolist() == [97, 98, 99, 256]
    bad = parser.parse_args(["--input", str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "p")])
    assert run_cli(bad) == 2
    assert "apogee preprocess: error: --input" in capsys.readouterr().err


def test_interrupted_run_leaves_no_dataset(tmp_path):
    """A run killed mid-way (SIGKILL, no cleanup) leaves only temporaries, never PREFIX.bin/.idx."""
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(json.dumps({"text": "x" * 200}) for _ in range(200_000)))
    script = ("import sys; from data_pipeline.preprocess import main; "
              f"sys.exit(main(['--input', {str(big)!r}, '--output-prefix', {str(tmp_path / 'ds')!r}, '--workers', '1']))")
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        process.wait(timeout=0.8)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    names = [p.name for p in tmp_path.iterdir()]
    if process.returncode == 0:  # finished before the kill on a fast machine: output is complete
        assert len(IndexedDatasetReader(str(tmp_path / "ds"))) == 200_000
    else:
        assert "ds.bin" not in names and "ds.idx" not in names


def test_hf_tokenizer_file_with_workers_and_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": "hello world " * (i + 1)}) for i in range(200)))
    summary = preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "hf"), tokenizer=str(tmp_path / "tokenizer.json"),
                         workers=2, progress=False, dtype="int32")
    reader = IndexedDatasetReader(str(tmp_path / "hf"))
    assert reader.dtype == np.int32 and summary["documents"] == 200
    assert reader[0].tolist() == [1, 2, 3] and reader[199].tolist() == [1, 2] * 200 + [3]


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_dataset_file_as_input_asks_for_the_prefix(tmp_path, suffix):
    (tmp_path / "a.txt").write_text("abc")
    preprocess([str(tmp_path / "a.txt")], str(tmp_path / "ds"), workers=1, progress=False)
    prefix = str(tmp_path / "ds")
    quoted = re.escape(repr(prefix))
    _assert_fails_cleanly(tmp_path, rf"--input {re.escape(repr(prefix + suffix))}: one file of the already "
                                    rf"preprocessed dataset {quoted} .* did you mean {quoted}\?", [prefix + suffix],
                          workers=1)


RANK_THAT_PREPROCESSES = """
import sys, time
from pathlib import Path
from engine.resilience.exit_records import ExitRecorder
from data_pipeline.preprocess import preprocess
root = Path(sys.argv[1])
ExitRecorder(0, root)  # as a training rank: SIGTERM/SIGHUP caught through a wakeup pipe
(root / "d.jsonl").write_text("\\n".join('{"text": "document %d"}' % i for i in range(500)))
preprocess([str(root / "d.jsonl")], str(root / "ds"), workers=2, progress=False)
time.sleep(1.0)  # a phantom signal written into the pipe would have ended this process by now
print("still running", flush=True)
"""


def test_a_rank_that_preprocesses_with_workers_is_not_stopped_by_their_shutdown(tmp_path):
    """Pool workers are SIGTERMed when the pool closes; forked from a rank, they shared its signal
    wakeup pipe and the rank read their SIGTERM as its own (the walkthrough's pretrain exited 143
    after building its corpus; this script, with a fork pool, hung)."""
    done = subprocess.run([sys.executable, "-c", RANK_THAT_PREPROCESSES, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, ["still running"]), done.stderr[-2000:]
    assert IndexedDatasetReader(str(tmp_path / "ds")).num_documents == 500

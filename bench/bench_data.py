"""Data pipeline throughput, Apogee against megatron-core on the same files.

Prints, side by side with the ratio Apogee / megatron-core:
  - preprocessing: `apogee preprocess` of the stdlib corpus (tokens/s, end to end), and the
    .bin/.idx write path alone (IndexedDatasetWriter vs IndexedDatasetBuilder, same tokens);
  - sample reads: random (sequence, offset, seq_length + 1) slices through Apogee's
    IndexedDatasetReader vs megatron-core's IndexedDataset on the same .bin/.idx;
  - GPT samples: Apogee's GPTDataset[i] vs megatron-core's GPTDataset sample query (the
    same samples: the first 100 are checked equal);
  - corpus formats: `apogee preprocess` of one corpus (stdlib paragraphs, ~--format-mb MB as
    JSONL) kept as .jsonl, .jsonl.gz, .jsonl.zst, Parquet and `datasets` save_to_disk, side by
    side: MB/s (of the JSONL-sized corpus, so rates compare directly), docs/s, size on disk
    and the ratio to JSONL; the outputs are checked byte-identical.
Run: python bench/bench_data.py [--reads N] [--seq-length S] [--workers W] [--format-mb MB] [--formats] [--quick]
--formats: the formats table alone; --quick: that table on a 2 MB corpus (the smoke test's version).
"""
import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.gpt_dataset import GPTDataset  # noqa: E402
from data_pipeline.indexed_dataset import IndexedDatasetReader, IndexedDatasetWriter  # noqa: E402
from data_pipeline.named_inputs import stdlib_files  # noqa: E402
from data_pipeline.preprocess import preprocess  # noqa: E402



class _TokenizerStub:
    """The tokenizer fields megatron-core's GPTDatasetConfig reads (byte tokenizer ids)."""

    vocab_size, eod, pad = 258, 256, 257
    unique_identifiers = {"class": "ByteTokenizerStub"}


def _megatron_gpt(prefix: str, seq_length: int, cache: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_length, blend=([prefix], None), split="1,0,0",
                              tokenizer=_TokenizerStub(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=cache, mmap_bin_files=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(MegatronGPTDataset, [None, 0, 0], lambda: True, config).build()[0]


def _rate(function, amount: float, repeats: int = 3) -> float:
    """Best-of-`repeats` amount per second of function()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return amount / best


def _row(name: str, ours: float, theirs: float | None, unit: str) -> None:
    ratio = f"{ours / theirs:7.2f}x" if theirs else "      -"
    theirs_text = f"{theirs:14,.0f}" if theirs else f"{'-':>14}"
    print(f"{name:<34}{ours:14,.0f}{theirs_text}  {ratio}  {unit}")


def _paragraphs(megabytes: float) -> list:
    """Documents of real text: stdlib paragraphs, cycled until their JSONL is ~`megabytes` MB."""
    paragraphs = []
    for path in stdlib_files():
        with open(path, encoding="utf-8", errors="replace") as handle:
            paragraphs.extend(p for p in handle.read().split("\n\n") if p.strip())
    documents, size, target = [], 0, megabytes * 1e6
    while size < target:
        for paragraph in paragraphs:
            documents.append(paragraph)
            size += len(json.dumps({"text": paragraph})) + 1
            if size >= target:
                break
    return documents


def _write_formats(documents: list, directory: str) -> dict:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst, Parquet and save_to_disk; {format: path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    raw = "".join(json.dumps({"text": text}) + "\n" for text in documents).encode()
    paths = {name: os.path.join(directory, f"corpus.{name}") for name in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")}
    paths["save_to_disk"] = os.path.join(directory, "corpus-saved")
    with open(paths["jsonl"], "wb") as handle:
        handle.write(raw)
    with open(paths["jsonl.gz"], "wb") as handle:
        handle.write(gzip.compress(raw, compresslevel=6))
    with open(paths["jsonl.zst"], "wb") as handle:
        handle.write(zstandard.ZstdCompressor(level=3).compress(raw))
    pq.write_table(pa.table({"text": documents}), paths["parquet"])
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        datasets.Dataset.from_dict({"text": documents}).save_to_disk(paths["save_to_disk"])
    return paths


def _disk_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    return os.path.getsize(path)


def formats_table(megabytes: float, workers: int | None, work: str) -> None:
    """Preprocess one corpus kept in each format, side by side; print MB/s, docs/s and the ratio to JSONL."""
    documents = _paragraphs(megabytes)
    paths = _write_formats(documents, work)
    corpus_mb = os.path.getsize(paths["jsonl"]) / 1e6
    print(f"corpus formats: {len(documents):,} stdlib paragraphs, {corpus_mb:.1f} MB as JSONL; "
          f"workers {workers or os.cpu_count()} of {os.cpu_count()} cores")
    print(f"{'format':<16}{'disk MB':>10}{'seconds':>10}{'MB/s':>10}{'docs/s':>12}  {'vs jsonl':>8}")
    reference, jsonl_rate = None, None
    for name, path in paths.items():
        prefix = os.path.join(work, f"out-{name}")
        with contextlib.redirect_stdout(io.StringIO()):
            summary = preprocess([path], prefix, workers=workers, progress=False)
        with open(prefix + ".bin", "rb") as bin_file, open(prefix + ".idx", "rb") as idx_file:
            output = (bin_file.read(), idx_file.read())
        reference = reference or output
        assert output == reference, f"{name}: output differs from the JSONL path's"
        seconds = summary["seconds"]
        jsonl_rate = jsonl_rate or corpus_mb / seconds
        print(f"{name:<16}{_disk_bytes(path) / 1e6:>10.1f}{seconds:>10.2f}{corpus_mb / seconds:>10.1f}"
              f"{summary['documents'] / seconds:>12,.0f}  {corpus_mb / seconds / jsonl_rate:>7.2f}x")
    print("(MB/s counts the JSONL-sized corpus for every format; outputs byte-identical: checked)")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--format-mb", type=float, default=100.0, help="corpus size for the formats table")
    parser.add_argument("--formats", action="store_true", help="the formats table alone")
    parser.add_argument("--quick", action="store_true", help="the formats table alone, on a 2 MB corpus")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="apogee-bench-")
    if args.formats or args.quick:
        formats_table(2.0 if args.quick else args.format_mb, args.workers, work)
        shutil.rmtree(work, ignore_errors=True)
        return
    with warnings.catch_warnings():  # imported here: --quick runs without megatron-core's import time
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    prefix = os.path.join(work, "stdlib")
    summary = preprocess(["stdlib"], prefix, workers=args.workers, progress=False)
    tokens = summary["tokens"]
    preprocess_rate = _rate(lambda: preprocess(["stdlib"], prefix + "-again", workers=args.workers,
                                               progress=False), tokens, repeats=2)

    ours = IndexedDatasetReader(prefix)
    documents = [np.array(ours[i]) for i in range(len(ours))]

    def write_ours():
        with IndexedDatasetWriter(os.path.join(work, "w-ours"), np.uint16) as writer:
            for document in documents:
                writer.add_document(document)

    def write_theirs():
        builder = IndexedDatasetBuilder(os.path.join(work, "w-theirs.bin"), dtype=np.uint16)
        for document in documents:
            builder.add_item(torch.from_numpy(document.astype(np.int64)))
            builder.end_document()
        builder.finalize(os.path.join(work, "w-theirs.idx"))

    theirs = IndexedDataset(prefix)
    rng = np.random.default_rng(0)
    length = args.seq_length + 1
    lengths = np.asarray(ours.sequence_lengths)
    eligible = np.flatnonzero(lengths > length)
    picks = rng.choice(eligible, args.reads)
    offsets = (rng.random(args.reads) * (lengths[picks] - length)).astype(np.int64)
    reads = list(zip(picks.tolist(), offsets.tolist()))

    def read(reader):
        def run():
            total = 0
            for index, offset in reads:
                total += int(reader.get(index, offset=offset, length=length)[0])
            return total
        return run

    gpt = GPTDataset(prefix, args.seq_length, None, 1234)
    megatron_gpt = _megatron_gpt(prefix, args.seq_length, os.path.join(work, "mcache"))
    samples = min(args.reads // 10, len(gpt))
    assert all(np.array_equal(gpt[i], megatron_gpt._query_document_sample_shuffle_indices(i)[0]) for i in range(100))
    print(f"corpus: stdlib, {summary['documents']} documents, {tokens:,} tokens; seq_length {args.seq_length}; "
          f"{os.cpu_count()} cores")
    print(f"{'':<34}{'apogee':>14}{'megatron-core':>14}  {'ratio':>8}")
    _row("preprocess stdlib (end to end)", preprocess_rate, None, "tokens/s  (megatron-core ships no preprocessor)")
    _row("write .bin/.idx", _rate(write_ours, tokens), _rate(write_theirs, tokens), "tokens/s")
    ours_reads, theirs_reads = _rate(read(ours), args.reads), _rate(read(theirs), args.reads)
    _row("random sample reads", ours_reads, theirs_reads, "reads/s")
    _row("random sample reads", ours_reads * length, theirs_reads * length, "tokens/s")
    _row("GPT samples (same samples)", _rate(lambda: [gpt[i] for i in range(samples)], samples),
         _rate(lambda: [megatron_gpt._query_document_sample_shuffle_indices(i) for i in range(samples)], samples),
         "samples/s")
    print()
    formats_table(args.format_mb, args.workers, work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

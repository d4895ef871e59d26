"""`apogee preprocess`: text, JSON lines, Parquet, `datasets` and directories -> a Megatron PREFIX.bin/.idx dataset.

Inputs, each one of (data_pipeline.readers reads the formats):
  - a .jsonl, .jsonl.gz or .jsonl.zst file: one JSON object per line, the document is the
    value of `json_key` (blank lines are skipped);
  - a .parquet or .arrow file: one document per row, the `json_key` column;
  - a Hugging Face `datasets` Dataset saved with save_to_disk (its directory);
  - any other file: the whole file (UTF-8) is one document;
  - a directory: its files, recursively and in sorted order, whose suffix is in TEXT_SUFFIXES
    or CORPUS_SUFFIXES, and the save_to_disk datasets in it (hidden entries and __pycache__
    are skipped);
  - a named input from data_pipeline.named_inputs (e.g. 'stdlib').
Every document is tokenized, gets EOD appended and becomes one sequence and one document of
the output: the same documents give the same bytes whatever format held them. Empty documents
are skipped. Tokenization runs in a pool of worker processes; results are written in input
order, so the output does not depend on the number of workers.
The dataset is written under temporary names and renamed when complete: an interrupted or
failed run leaves no PREFIX.bin/.idx behind. An output folder that cannot be written (read-only,
no permission) is a DataError naming it, before any input is read (`unwritable`).
"""
import contextlib
import errno
import functools
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from data_pipeline import DataError
from data_pipeline.named_inputs import NAMED_INPUTS, named_input_files
from data_pipeline.indexed_dataset import (TOKEN_DTYPES, IndexedDatasetWriter, bin_path, dtype_for_vocab, idx_path,
                                           prefix_of_dataset_file)
from data_pipeline.readers import JSONL_SUFFIXES, documents, saved_dataset_files, where
from data_pipeline.tokenizer import get_tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
# .arrow files are read inside save_to_disk directories or when named; loose ones in a tree are
# often caches (e.g. a `datasets` cache directory), so a directory walk does not take them.
CORPUS_SUFFIXES = JSONL_SUFFIXES + (".parquet",)
DOCUMENTS_PER_TASK = 64  # documents shipped to a worker at once: amortizes IPC, keeps order cheap


def expand_inputs(inputs: list) -> list:
    """The files behind `inputs` (files, directories, named inputs), in a deterministic order."""
    if not inputs:
        raise DataError(f"--input: no inputs given; give text, .jsonl(.gz/.zst) or .parquet files, save_to_disk "
                        f"datasets, directories or one of {sorted(NAMED_INPUTS)}")
    files = []
    for spec in inputs:
        if spec in NAMED_INPUTS:
            files.extend(named_input_files(spec))
        elif os.path.isdir(spec):
            files.extend(_walk(spec))
        elif prefix_of_dataset_file(spec) is not None:
            prefix = prefix_of_dataset_file(spec)
            raise DataError(f"--input {spec!r}: one file of the already preprocessed dataset {prefix!r} "
                            f"({prefix}.bin + {prefix}.idx), not text; did you mean {prefix!r}? Train on it "
                            f"by its prefix (data.inputs=[{prefix}])")
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise DataError(f"--input {spec!r}: no such file or directory; valid inputs are existing files, "
                            f"directories, or one of {sorted(NAMED_INPUTS)}")
    return files


def _walk(directory: str) -> list:
    """Text, JSONL and Parquet files and save_to_disk datasets under `directory`, recursively, sorted."""
    found = []
    for root, dirs, names in os.walk(directory):
        saved = saved_dataset_files(root)
        if saved is not None:  # a dataset's directory: its Arrow files, in its own order
            found.extend(saved)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            if not name.startswith(".") and name.endswith(TEXT_SUFFIXES + CORPUS_SUFFIXES):
                found.append(os.path.join(root, name))
    return found


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name: str):
    # One tokenizer per worker process: loading an HF file per task would dominate small tasks.
    return get_tokenizer(name)


class _Encoder:
    """Turns raw documents into token arrays (with EOD); picklable, runs in worker processes."""

    def __init__(self, tokenizer: str, json_key: str, dtype):
        self.tokenizer, self.json_key, self.dtype = tokenizer, json_key, np.dtype(dtype)

    def text_of(self, path: str, line: int | None, raw) -> str:
        """The document's text, or DataError naming file and line."""
        if isinstance(raw, str):  # an Arrow/Parquet row: the reader has checked it already
            return raw
        where = f"{path}:{line}" if line else path
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 at byte {error.start}; inputs must be UTF-8 text") from None
        if line is None:
            return decoded
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); "
                            f"each line of a .jsonl file must be one JSON object") from None
        if not isinstance(record, dict) or self.json_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no key {self.json_key!r} (found {keys}); set --json-key to the text field")
        text = record[self.json_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: key {self.json_key!r} holds {type(text).__name__}, expected a string")
        return text

    def __call__(self, batch: list) -> list:
        """[(path, position, payload, disk bytes)] -> [(tokens or None if empty, input bytes, disk bytes)]."""
        tokenizer = _cached_tokenizer(self.tokenizer)
        info = np.iinfo(self.dtype)
        out = []
        for path, line, raw, disk in batch:
            text = self.text_of(path, line, raw)
            # Input bytes are UTF-8 bytes; isascii() is a flag lookup, so only non-ASCII rows are encoded.
            size = len(raw) if not isinstance(raw, str) or raw.isascii() else len(raw.encode("utf-8"))
            if not text:
                out.append((None, size, disk))
                continue
            ids = np.append(tokenizer.encode_array(text), tokenizer.eod_id)
            high, low = int(ids.max()), int(ids.min())
            if high > info.max or low < info.min:
                raise DataError(f"{where(path, line, raw)}: token id {high if high > info.max else low} does not "
                                f"fit dtype {self.dtype} (valid ids {info.min}..{info.max}); use --dtype int32")
            out.append((ids.astype(self.dtype), size, disk))
        return out


def _batches(documents, size: int):
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
"""OSError numbers of a folder that cannot take a write: read-only file system, no permission."""


@contextlib.contextmanager
def unwritable(root: str, where: str, what: str):
    """Turn an OSError of a write under `root` that it cannot take (UNWRITABLE) into one DataError line
    naming `where` (the option and its value), the path and `what` to do; other errors pass as they are."""
    try:
        yield
    except OSError as error:
        path = os.path.abspath(error.filename) if isinstance(error.filename, str) else None
        inside = path is not None and (path + os.sep).startswith(os.path.abspath(root or ".") + os.sep)
        if error.errno not in UNWRITABLE or not inside:
            raise
        raise DataError(f"{where}: cannot write {error.filename} ({error.strerror}); {what}") from None


def preprocess(inputs: list, output_prefix: str, tokenizer: str = "byte", json_key: str = "text",
               workers: int | None = None, progress: bool = True, dtype: str | None = None,
               where: str | None = None) -> dict:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx; returns {documents, tokens, bytes, seconds, ...}.

    dtype: 'uint8' | 'uint16' | 'int32' | 'int64'; default Megatron's rule (uint16 when the
    vocabulary has < 65500 ids, else int32). workers: processes (default: all cores). where: how
    errors name the output (default '--output-prefix PREFIX').
    """
    start = time.perf_counter()
    tok = get_tokenizer(tokenizer)
    if dtype is None:
        token_dtype = dtype_for_vocab(tok.vocab_size)
    elif dtype in TOKEN_DTYPES:
        token_dtype = TOKEN_DTYPES[dtype]
    else:
        raise DataError(f"--dtype {dtype!r}: unknown; valid: {sorted(TOKEN_DTYPES)}")
    files = expand_inputs(inputs)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if multiprocessing.current_process().daemon:
        workers = 1  # daemonic processes (e.g. pool workers) may not start children
    suffix = f".tmp-{os.getpid()}-{time.time_ns()}"
    folder = os.path.dirname(output_prefix)
    with unwritable(folder or ".", where or f"--output-prefix {output_prefix}", "give a folder this process can write"):
        if folder:
            os.makedirs(folder, exist_ok=True)
        writer = IndexedDatasetWriter(output_prefix, token_dtype, bin_path(output_prefix) + suffix,
                                      idx_path(output_prefix) + suffix)
    encoder = _Encoder(tokenizer, json_key, token_dtype)
    total_bytes = sum(os.path.getsize(path) for path in files)
    written = input_bytes = 0
    bar = _progress_bar(total_bytes, progress)
    pool = None
    try:
        batches = _batches(documents(files, json_key), DOCUMENTS_PER_TASK)
        if workers > 1:
            # forkserver, not fork: forking a process that runs other threads (torch's and gloo's pools,
            # a training rank's watchdog) can copy a held lock into the child, which then hangs. The
            # server starts clean with this module preloaded, so each worker still starts in milliseconds.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data_pipeline.preprocess"])
            pool = context.Pool(workers)
            results = pool.imap(encoder, batches, chunksize=1)
        else:
            results = map(encoder, batches)
        for batch in results:
            for tokens, size, _ in batch:
                input_bytes += size
                if tokens is not None:
                    writer.add_document(tokens)
                    written += 1
            if bar is not None:
                bar.update(sum(disk for _, _, disk in batch))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(docs_per_s=f"{written / elapsed:.0f}", refresh=False)
        if written == 0:
            raise DataError(f"--input {inputs}: empty corpus, no non-empty documents in {len(files)} file(s)")
        writer.finalize()
        # .bin first, .idx last: a PREFIX.idx next to its PREFIX.bin marks a complete dataset.
        os.replace(writer.bin_file, bin_path(output_prefix))
        os.replace(writer.idx_file, idx_path(output_prefix))
    except BaseException:
        writer.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary = {"output_prefix": output_prefix, "documents": written, "tokens": writer.num_tokens,
               "bytes": input_bytes, "seconds": seconds, "dtype": np.dtype(token_dtype).name, "tokenizer": tokenizer}
    print(f"preprocess: {written} documents, {writer.num_tokens} tokens, {input_bytes} bytes in {seconds:.2f} s "
          f"({writer.num_tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {output_prefix}.bin/.idx ({summary['dtype']})",
          flush=True)
    return summary


def _progress_bar(total_bytes: int, enabled: bool):
    """A tqdm bar on stderr (MB/s, documents/s), or None when disabled or stderr is not a tty."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                file=sys.stderr, dynamic_ncols=True)

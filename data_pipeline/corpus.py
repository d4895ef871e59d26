"""Raw inputs (files, directories, named corpora such as 'stdlib') preprocessed once into a shared cache."""
import fcntl
import hashlib
import json
import os

from data_pipeline import DataError
from data_pipeline.indexed_dataset import dataset_exists, prefix_of_dataset_file
from data_pipeline.named_inputs import NAMED_INPUTS
from data_pipeline.tokenizer import tokenizer_fingerprint


def _fingerprint(spec: str, tokenizer: str) -> str:
    """Hash of the input file list (path, size, mtime) and the tokenizer: the cache key."""
    from data_pipeline.preprocess import expand_inputs

    files = expand_inputs([spec])
    listing = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    payload = json.dumps({"files": listing, "tokenizer": tokenizer_fingerprint(tokenizer)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_corpus(spec: str, cache_dir: str, tokenizer: str = "byte") -> str:
    """A dataset prefix for `spec`: an existing PREFIX(.bin/.idx) is returned as is; 'stdlib' or a
    raw text file/directory is preprocessed once into `cache_dir` and that prefix returned.

    Safe when several ranks call it at once: one takes an exclusive file lock and preprocesses,
    the others wait on the lock and then reuse its output.
    """
    if dataset_exists(spec):
        return spec
    prefix = prefix_of_dataset_file(spec)
    if prefix is not None:  # read as text, a .bin would be trained on as if its bytes were words
        raise DataError(f"data input {spec!r}: one file of the dataset {prefix!r} ({prefix}.bin + {prefix}.idx); "
                        f"did you mean {prefix!r}? A dataset is named by its prefix, without .bin/.idx")
    if spec not in NAMED_INPUTS and not os.path.exists(spec):
        raise DataError(f"data input {spec!r}: neither a dataset prefix (no {spec}.bin/.idx) nor an existing "
                        f"file or directory; valid: a PREFIX with .bin/.idx, a text/jsonl path, or {list(NAMED_INPUTS)}")
    from data_pipeline.preprocess import preprocess

    label = spec if spec in NAMED_INPUTS else os.path.basename(os.path.normpath(spec)) or "input"
    prefix = os.path.join(cache_dir, f"corpus-{label}-{_fingerprint(spec, tokenizer)}")
    if dataset_exists(prefix):  # a read-only cache that holds it already is fine
        return prefix
    with cache_writes(cache_dir):
        os.makedirs(cache_dir, exist_ok=True)
        with open(prefix + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not dataset_exists(prefix):  # a rank that held the lock before us may have built it
                    preprocess([spec], prefix, tokenizer=tokenizer, progress=True,
                               where=f"data.cache_dir={cache_dir!r}")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return prefix


def cache_writes(cache_dir: str):
    """A context in which a write data.cache_dir cannot take (read-only, no permission) is one
    DataError line naming it (preprocessed corpora, sample indices and token ranges are cached there)."""
    from data_pipeline.preprocess import unwritable

    return unwritable(cache_dir, f"data.cache_dir={cache_dir!r}",
                      "the cache holds preprocessed corpora and sample indices: give a writable data.cache_dir")

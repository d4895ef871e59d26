"""The range of token ids in a dataset's .bin, scanned once and cached; the check against a vocabulary.

A token id at or above the model's vocabulary indexes past the embedding table: one rank dies
with an IndexError, or vocab-parallel layers silently look up zero embeddings and train on
wrong targets. Training therefore checks every dataset before any rank starts.

Scanning reads every token of the .bin, so the result is cached in `cache_dir` as a small JSON
file keyed by the dataset's absolute prefix and the size and mtime of its .bin and .idx: a
later run over unchanged files reads only that file, a rewritten dataset is scanned again. The
.idx itself is left untouched (it stays byte-compatible with megatron-core's).
"""
import hashlib
import json
import os

import numpy as np

from data_pipeline import DataError
from data_pipeline.indexed_dataset import IndexedDatasetReader, bin_path, idx_path

CACHE_VERSION = 1  # bump when the cached fields change, to invalidate old entries
SCAN_CHUNK_TOKENS = 1 << 25  # tokens reduced at once: bounds the time a chunk stays out of cache


def _file_key(prefix: str) -> dict:
    """What the cached range depends on: where the dataset is and the identity of its two files."""
    key = {"version": CACHE_VERSION, "prefix": os.path.abspath(prefix)}
    for name, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
        stat = os.stat(path)
        key[f"{name}_size"], key[f"{name}_mtime_ns"] = stat.st_size, stat.st_mtime_ns
    return key


def _cache_path(key: dict, cache_dir: str) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"token-range-{digest}.json")


def cache_file(prefix: str, cache_dir: str) -> str:
    """The path of the cached token range of dataset `prefix` (as its files are now) in `cache_dir`."""
    return _cache_path(_file_key(prefix), cache_dir)


def scan_token_range(prefix: str) -> tuple[int, int] | None:
    """(smallest, largest) token id in PREFIX.bin, reading every token; None when it holds none."""
    reader = IndexedDatasetReader(prefix)
    if not np.issubdtype(reader.dtype, np.integer):
        raise DataError(f"{idx_path(prefix)}: dtype {reader.dtype}, not token ids; a token dataset holds "
                        f"an integer dtype (uint8, uint16, int32, int64)")
    tokens = reader.tokens
    if tokens.size == 0:
        return None
    low, high = None, None
    for start in range(0, tokens.size, SCAN_CHUNK_TOKENS):
        chunk = tokens[start:start + SCAN_CHUNK_TOKENS]
        chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
    return low, high


def _load_cached(path: str, key: dict):
    """The cached range at `path` if it is there, intact and for `key`; else False (scan again)."""
    try:
        with open(path) as handle:
            entry = json.load(handle)
    except (OSError, ValueError):
        return False
    if not isinstance(entry, dict) or entry.get("key") != key or "range" not in entry:
        return False
    value = entry["range"]
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    return False


def token_id_range(prefix: str, cache_dir: str | None = None) -> tuple[int, int] | None:
    """(smallest, largest) token id of dataset `prefix`, scanned once per .bin and cached in `cache_dir`.

    None when the dataset holds no tokens. cache_dir None: scan every time.
    """
    if cache_dir is None:
        return scan_token_range(prefix)
    key = _file_key(prefix)
    path = _cache_path(key, cache_dir)
    cached = _load_cached(path, key)
    if cached is not False:
        return cached
    value = scan_token_range(prefix)
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump({"key": key, "range": None if value is None else list(value)}, handle)
    os.replace(temporary, path)  # ranks racing here write the same entry; the last rename wins
    return value


def max_token_id(prefix: str, cache_dir: str | None = None) -> int | None:
    """The largest token id of dataset `prefix` (None when it holds no tokens); cached, see token_id_range."""
    value = token_id_range(prefix, cache_dir)
    return None if value is None else value[1]


def check_token_ids(prefix: str, vocab_size: int, cache_dir: str | None = None,
                    option: str = "vocab_size") -> None:
    """Raise DataError unless every token id of dataset `prefix` is in 0..vocab_size-1.

    vocab_size is the model's real vocabulary (not an embedding padded for tensor
    parallelism); `option` names where it was set, for the message (e.g. 'model.vocab_size').
    """
    value = token_id_range(prefix, cache_dir)
    if value is None:
        return
    low, high = value
    if high >= vocab_size:
        raise DataError(f"{bin_path(prefix)}: token id {high} >= {option}={vocab_size} "
                        f"(valid ids 0..{vocab_size - 1}); the dataset was tokenized with a larger vocabulary: "
                        f"preprocess it again with this run's tokenizer, or set {option} to at least {high + 1}")
    if low < 0:
        raise DataError(f"{bin_path(prefix)}: token id {low} is negative (valid ids 0..{vocab_size - 1}); "
                        f"the .bin does not hold token ids")

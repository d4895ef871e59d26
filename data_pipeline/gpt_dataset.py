"""GPT samples: seq_length + 1 tokens cut from a seeded shuffle of the documents.

The three indices are built exactly as megatron-core's GPTDataset builds them
(`_build_document_sample_shuffle_indices`), so for the same .bin/.idx, seed, split, sequence
length and sample count, sample i here is sample i there and a run can move between engines:
  document index  every document id once per epoch, shuffled by numpy RandomState(seed); when
                  the last epoch would be less than 80% used it is shuffled on its own
  sample index    (document-index position, offset) where each sample starts (csrc helper)
  shuffle index   a RandomState permutation of the samples (last partial epoch on its own)
Built indices are cached as .npy files named by a hash of everything they depend on.
"""
import hashlib
import json
import os
import re

import numpy as np

from data_pipeline import DataError
try:
    from data_pipeline import _helpers
except ImportError as error:  # the C++ extension is built by setup.py, not imported from source
    raise ImportError("data_pipeline._helpers (csrc/helpers.cpp) is not built; run "
                      "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`") from error
from data_pipeline.indexed_dataset import IndexedDatasetReader, bin_path, idx_path

INDEX_FORMAT_VERSION = 1  # bump when the index construction changes, to invalidate caches
LAST_EPOCH_THRESHOLD = 0.80  # Megatron's rule for shuffling a short final epoch separately


SPLITS = ("train", "valid", "test")
"""The parts of a Megatron split string, in order."""


def split_fractions(split: str) -> list[float]:
    """The normalised train, valid, test weights of a Megatron split string such as '969,30,1'."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not parts or len(parts) > 3 or sum(parts) <= 0:
        raise DataError(f"data.split={split!r}: expected up to three non-negative numbers with a positive sum, "
                        f"e.g. '1,0,0' or '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    weights = np.array(parts, dtype=np.float64)
    return (weights / weights.sum()).tolist()


def split_documents(split: str, num_sequences: int, part: int = 0) -> np.ndarray:
    """Sequence ids of part `part` (0 train, 1 valid, 2 test) of a split, as megatron-core's
    BlendedMegatronDatasetBuilder cuts them: [round(lo * n), round(hi * n)) with lo, hi the
    running sums of the normalised weights (empty when the part's weight is 0)."""
    fractions = split_fractions(split)
    if fractions[part] == 0:
        return np.arange(0, dtype=np.int32)
    low = 0.0
    for fraction in fractions[:part]:
        low = low + fraction  # the same float additions as Megatron's functools.reduce
    high = low + fractions[part]
    begin, end = int(round(low * float(num_sequences))), int(round(high * float(num_sequences)))
    return np.arange(begin, end, dtype=np.int32)


def train_documents(split: str, num_sequences: int) -> np.ndarray:
    """Sequence ids of the train part of a Megatron split string such as '969,30,1'."""
    return split_documents(split, num_sequences, 0)


def _num_epochs(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """Epochs needed so that num_samples samples of seq_length + 1 tokens exist."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def _document_index(documents: np.ndarray, epochs: int, rng: np.random.RandomState, separate_last: bool) -> np.ndarray:
    if separate_last and epochs > 1:
        first = _document_index(documents, epochs - 1, rng, False)
        return np.concatenate((first, _document_index(documents, 1, rng, False)))
    index = np.tile(documents.astype(np.int32), epochs)
    rng.shuffle(index)
    return index


def _shuffle_index(first_part: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first_part, dtype=dtype)
    rng.shuffle(head)
    if first_part == total:
        return head
    tail = np.arange(first_part, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate((head, tail))


def build_indices(sequence_lengths: np.ndarray, documents: np.ndarray, seq_length: int,
                  num_samples: int | None, seed: int):
    """(document_index, sample_index, shuffle_index) as megatron-core's GPTDataset builds them."""
    tokens_per_epoch = int(np.sum(sequence_lengths[documents]))
    if tokens_per_epoch <= 1:
        raise DataError(f"dataset has {tokens_per_epoch} tokens in {len(documents)} documents; need at least 2")
    epochs = _num_epochs(tokens_per_epoch, num_samples, seq_length)
    separate_last = False
    if epochs > 1:
        samples_before_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = num_samples - samples_before_last < int(LAST_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = _document_index(documents, epochs, rng, separate_last)
    lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
    # int32 positions suffice unless the stream or a document is longer than int32 can count.
    if max(document_index.shape[0], int(lengths.max())) <= np.iinfo(np.int32).max:
        build = _helpers.build_sample_idx_int32
    else:
        build = _helpers.build_sample_idx_int64
    sample_index = build(lengths, document_index, seq_length, epochs, tokens_per_epoch, True, 1)
    total = sample_index.shape[0] - 1
    first_part = samples_before_last if separate_last else total
    return document_index, sample_index, _shuffle_index(first_part, total, rng)


def _file_fingerprint(prefix: str) -> str:
    """Hash of the .idx contents and the .bin size: changes whenever the dataset does."""
    digest = hashlib.sha256()
    with open(idx_path(prefix), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    digest.update(str(os.path.getsize(bin_path(prefix))).encode())
    return digest.hexdigest()[:16]


def _save_atomically(path: str, array: np.ndarray) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        np.save(handle, array)
    os.replace(temporary, path)  # concurrent builders write identical files; last rename wins


class GPTDataset:
    """Samples of seq_length + 1 tokens over one .bin/.idx (train part of `split`).

    num_samples: samples wanted (None: one epoch); whole epochs are built, so len(self) can be
    larger. cache_dir: where the indices are cached (None: build in memory every time).
    part: which part of `split` (0 train, 1 valid, 2 test); each is shuffled with the same seed,
    as megatron-core does.
    """

    def __init__(self, prefix: str, seq_length: int, num_samples: int | None, seed: int,
                 cache_dir: str | None = None, split: str = "1,0,0", part: int = 0):
        if seq_length < 2:
            raise DataError(f"seq_length {seq_length}: must be >= 2")
        self.prefix, self.seq_length, self.seed = prefix, seq_length, seed
        self.reader = IndexedDatasetReader(prefix)
        documents = split_documents(split, len(self.reader), part)
        if len(documents) == 0:
            raise DataError(f"dataset {prefix!r}: data.split={split!r} leaves no {SPLITS[part]} documents "
                            f"(of {len(self.reader)})")
        key = {"version": INDEX_FORMAT_VERSION, "data": _file_fingerprint(prefix), "split": split,
               "documents": len(documents), "seq_length": seq_length, "num_samples": num_samples, "seed": seed}
        if part:  # the train part keeps the key (and cache files) it always had
            key["part"], key["first_document"] = part, int(documents[0])
        self.description = json.dumps(key, sort_keys=True)
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build(key, documents, cache_dir)

    def _load_or_build(self, key: dict, documents: np.ndarray, cache_dir: str | None):
        names = ("document_index", "sample_index", "shuffle_index")
        if cache_dir:
            digest = hashlib.sha256(self.description.encode()).hexdigest()[:20]
            paths = [os.path.join(cache_dir, f"gpt-{digest}-{name}.npy") for name in names]
            if all(os.path.isfile(path) for path in paths):
                return tuple(np.load(path, mmap_mode="r") for path in paths)
        indices = build_indices(self.reader.sequence_lengths, documents, self.seq_length,
                                key["num_samples"], self.seed)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            for path, array in zip(paths, indices):
                _save_atomically(path, array)
            with open(os.path.join(cache_dir, f"gpt-{digest}-description.json"), "w") as handle:
                handle.write(self.description)
        return indices

    def __len__(self) -> int:
        """Number of samples available (whole epochs)."""
        return self.sample_index.shape[0] - 1

    def sample_into(self, index: int, out: np.ndarray) -> list[int]:
        """Write sample `index` (seq_length + 1 tokens) into the int64 array `out`; returns the
        lengths of the pieces of each .idx sequence (document) it holds, in order."""
        if not 0 <= index < len(self):
            raise DataError(f"dataset {self.prefix!r}: sample {index} out of range [0, {len(self)})")
        position = int(self.shuffle_index[index])
        first_doc, first_offset = (int(v) for v in self.sample_index[position])
        last_doc, last_offset = (int(v) for v in self.sample_index[position + 1])
        filled, pieces = 0, []
        for doc_position in range(first_doc, last_doc + 1):
            document = int(self.document_index[doc_position])
            offset = first_offset if doc_position == first_doc else 0
            # The sample ends one token past the next sample's start (the shared label token).
            length = last_offset + 1 - offset if doc_position == last_doc else None
            part = self.reader.get(document, offset, length)
            out[filled:filled + len(part)] = part
            filled += len(part)
            if len(part):
                pieces.append(len(part))
        return pieces

    def __getitem__(self, index: int) -> np.ndarray:
        """Sample `index`: an int64 array of seq_length + 1 tokens."""
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        self.sample_into(index, out)
        return out

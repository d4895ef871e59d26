"""Megatron indexed dataset (.bin/.idx): mmap reader with zero-copy slices, and a writer.

Byte-compatible both ways with megatron-core's IndexedDataset / IndexedDatasetBuilder.
Layout (little-endian), from megatron/core/datasets/indexed_dataset.py:
  .idx  magic b"MMIDIDX\\x00\\x00" | u64 version 1 | u8 dtype code | u64 sequence_count |
        u64 document_count | int32[sequence_count] lengths | int64[sequence_count] byte
        offsets into .bin | int64[document_count] document boundaries (0, then the running
        sequence count at each document end)
  .bin  the token arrays, concatenated
"""
import mmap
import os
import struct

import numpy as np

from data_pipeline import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + two u64 counts

DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
# Token dtypes a writer accepts, by name (what --dtype and preprocess(dtype=) take).
TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int32": np.int32, "int64": np.int64}


def dtype_for_vocab(vocab_size: int):
    """Megatron's rule (DType.optimal_dtype): uint16 when vocab_size < 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    """PREFIX.bin."""
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    """PREFIX.idx."""
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """True when both PREFIX.bin and PREFIX.idx exist."""
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


def prefix_of_dataset_file(path: str) -> str | None:
    """PREFIX when `path` is PREFIX.bin or PREFIX.idx of a dataset whose two files both exist, else None.

    Inputs are named by their prefix; a .bin given instead would otherwise be read as text.
    """
    for suffix in (".bin", ".idx"):
        if isinstance(path, str) and path.endswith(suffix) and dataset_exists(path[:-len(suffix)]):
            return path[:-len(suffix)]
    return None


def _map_file(path: str):
    """Read-only mmap of `path` (None for an empty file, which mmap cannot map)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDatasetReader:
    """Read-only view of PREFIX.bin/.idx; `get` returns zero-copy numpy slices of the mmap.

    Mirrors megatron-core's IndexedDataset: `len()` is the number of sequences, `[i]` and
    `get(i, offset, length)` return sequence i, `sequence_lengths`, `sequence_pointers` and
    `document_indices` are the index arrays.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        for path in (idx_path(prefix), bin_path(prefix)):
            if not os.path.isfile(path):
                raise DataError(f"dataset {prefix!r}: missing file {path}; a dataset is PREFIX.bin plus PREFIX.idx")
        self._idx_map = _map_file(idx_path(prefix))
        self._parse_index(idx_path(prefix))
        self._bin_map = _map_file(bin_path(prefix))
        bin_size = 0 if self._bin_map is None else len(self._bin_map)
        expected = int(self.sequence_pointers[-1] + self.sequence_lengths[-1] * self.dtype.itemsize) if len(self) else 0
        if bin_size < expected:
            raise DataError(f"{bin_path(prefix)}: {bin_size} bytes, but the index describes {expected}; "
                            f"the .bin is truncated or belongs to another .idx")
        self._tokens = (np.empty(0, dtype=self.dtype) if self._bin_map is None
                        else np.frombuffer(self._bin_map, dtype=self.dtype, count=expected // self.dtype.itemsize))

    def _parse_index(self, path: str) -> None:
        buffer = self._idx_map
        size = 0 if buffer is None else len(buffer)
        if size < HEADER_BYTES or buffer[:9] != INDEX_MAGIC:
            raise DataError(f"{path}: not a Megatron index file (expected magic {INDEX_MAGIC!r} and "
                            f">= {HEADER_BYTES} bytes)")
        version, code, sequences, documents = struct.unpack_from("<QBQQ", buffer, 9)
        if version != INDEX_VERSION:
            raise DataError(f"{path}: index version {version}, only version {INDEX_VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: dtype code {code} unknown; valid codes are {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        needed = HEADER_BYTES + sequences * 12 + documents * 8
        if size < needed:
            raise DataError(f"{path}: {size} bytes, but {sequences} sequences and {documents} documents "
                            f"need {needed}; the index is truncated")
        self.sequence_lengths = np.frombuffer(buffer, np.int32, sequences, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(buffer, np.int64, sequences, HEADER_BYTES + 4 * sequences)
        self.document_indices = np.frombuffer(buffer, np.int64, documents, HEADER_BYTES + 12 * sequences)

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the .bin that the index describes, as one read-only array (no copy)."""
        return self._tokens

    def __len__(self) -> int:
        """Number of sequences (one per document for text corpora)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (len(document_indices) - 1)."""
        return max(len(self.document_indices) - 1, 0)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index`: a read-only view, no copy."""
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[index]) - offset
        return self._tokens[start:start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        """All tokens of sequence `index` (zero-copy)."""
        return self.get(index)

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences are contiguous in .bin), zero-copy."""
        first, end = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if end == first:
            return self._tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        stop = int(self.sequence_pointers[end - 1]) // self.dtype.itemsize + int(self.sequence_lengths[end - 1])
        return self._tokens[start:stop]


class IndexedDatasetWriter:
    """Writes one document at a time to a .bin file and the .idx at `finalize()`.

    `bin_file` / `idx_file` default to PREFIX.bin / PREFIX.idx; preprocess passes temporary
    names and renames them once the whole dataset is written. Used as a context manager, a
    failure removes both files so no half-written dataset is left behind.
    """

    def __init__(self, prefix: str, dtype=np.uint16, bin_file: str | None = None, idx_file: str | None = None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"dtype {self.dtype}: not a Megatron dtype; valid: {sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}")
        self.bin_file = bin_file or bin_path(prefix)
        self.idx_file = idx_file or idx_path(prefix)
        self._bin = open(self.bin_file, "wb")
        self._lengths = []
        self.num_tokens = 0
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def add_document(self, tokens, source: str = "") -> None:
        """Append one document (one sequence). Ids outside the dtype's range raise DataError."""
        array = np.asarray(tokens)
        # An array already of the output dtype fits by construction; only others are checked.
        if self._range is not None and array.size and array.dtype != self.dtype:
            low, high = int(array.min()), int(array.max())
            if low < self._range[0] or high > self._range[1]:
                bad = high if high > self._range[1] else low
                where = source or f"document {len(self._lengths)}"
                raise DataError(f"{where}: token id {bad} does not fit dtype {self.dtype} "
                                f"(valid ids {self._range[0]}..{self._range[1]}); choose a wider dtype")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(int(array.size))
        self.num_tokens += int(array.size)

    def finalize(self) -> None:
        """Flush .bin and write .idx (both fsynced, so a later rename publishes complete files)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        with open(self.idx_file, "wb") as handle:
            handle.write(INDEX_MAGIC)
            handle.write(struct.pack("<QBQQ", INDEX_VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(documents)))
            handle.write(lengths.tobytes())
            handle.write(pointers.tobytes())
            handle.write(documents.tobytes())
            handle.flush()
            os.fsync(handle.fileno())

    def discard(self) -> None:
        """Close and delete both files (after a failure)."""
        self._bin.close()
        for path in (self.bin_file, self.idx_file):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.discard()

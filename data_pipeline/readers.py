"""Documents out of the formats corpora are kept in (what `apogee preprocess` reads).

By file name:
  *.jsonl, *.jsonl.gz, *.jsonl.zst   one JSON object per line (plain, gzip, zstandard); the
                                     document is the value of the json_key key
  *.parquet                          a Parquet file; the document is the json_key column
  *.arrow                            an Arrow IPC file (stream or file format), same column
  a save_to_disk directory           a Hugging Face `datasets` Dataset (state.json and
                                     dataset_info.json beside Arrow stream files): its Arrow
                                     files in the order state.json lists them
  anything else                      the whole file (UTF-8) is one document
Each document is (path, position, payload, disk_bytes): position is a JSON line's 1-based line
number, an Arrow/Parquet row's 0-based index (ds[row] in `datasets`) or None for a whole
file; payload is a line's raw bytes (parsed by the preprocess workers), a row's text (a str,
already checked here) or a file's bytes; disk_bytes is the part of the file on disk it stands
for, so a progress bar over file sizes reaches its end on compressed inputs too.
"""
import gzip
import io
import json
import os
import zlib

from data_pipeline import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
ROWS_PER_BATCH = 8192  # Parquet rows decoded at once: bounds memory, keeps per-batch overhead small
READ_BUFFER_BYTES = 1 << 20


def where(path: str, position, payload) -> str:
    """'file:line', 'file:row N' or 'file' for a document, as errors name it."""
    if position is None:
        return path
    return f"{path}:row {position}" if isinstance(payload, str) else f"{path}:{position}"


def saved_dataset_files(directory: str) -> list | None:
    """The Arrow files of a `datasets` save_to_disk directory in row order; None for another directory.

    A DatasetDict (dataset_dict.json, one sub-directory per split) is refused: which splits
    to train on is the user's choice, so the message names them.
    """
    dict_file = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(dict_file):
        splits = sorted(name for name in os.listdir(directory) if os.path.isdir(os.path.join(directory, name)))
        example = os.path.join(directory, "train" if "train" in splits or not splits else splits[0])
        raise DataError(f"{directory}: a `datasets` DatasetDict with splits {splits}; give the directory of "
                        f"the split to read, e.g. {example}")
    state_file = os.path.join(directory, "state.json")
    if not (os.path.isfile(state_file) and os.path.isfile(os.path.join(directory, "dataset_info.json"))):
        return None
    try:
        with open(state_file, "rb") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"{state_file}: not readable as JSON ({error}); expected the state.json that "
                        f"Dataset.save_to_disk writes") from None
    entries = state.get("_data_files") if isinstance(state, dict) else None
    names = [entry.get("filename") for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    # A plain file name only: state.json must not point the reader outside the dataset's directory.
    if not names or len(names) != len(entries) or not all(
            isinstance(n, str) and n and os.path.basename(n) == n and n not in (".", "..") for n in names):
        raise DataError(f"{state_file}: '_data_files' is {entries!r}; expected a list of "
                        f"{{'filename': 'data-00000-of-00001.arrow'}} entries naming files in {directory}")
    if state.get("_indices_data_files"):
        raise DataError(f"{state_file}: the dataset has an indices mapping (saved by an old `datasets`); "
                        f"save it again after ds.flatten_indices()")
    files = [os.path.join(directory, name) for name in names]
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{directory}: state.json lists {missing[0]}, which does not exist; the dataset is incomplete")
    return files


def documents(files: list, json_key: str):
    """Every document of `files`, in order (see the module docstring for the tuples)."""
    for path in files:
        if path.endswith(".jsonl"):
            yield from _plain_lines(path)
        elif path.endswith(".jsonl.gz"):
            yield from _compressed_lines(path, "gzip", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"))
        elif path.endswith(".jsonl.zst"):
            yield from _compressed_lines(path, "zstandard", _zstd_stream)
        elif path.endswith(".parquet"):
            yield from _parquet_rows(path, json_key)
        elif path.endswith(".arrow"):
            yield from _arrow_rows(path, json_key)
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
            yield path, None, raw, len(raw)


def _plain_lines(path: str):
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield path, number, line, len(line)


def _zstd_stream(raw):
    return io.BufferedReader(_ZstdFrames(raw), READ_BUFFER_BYTES)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in the file `raw`; a truncated last frame raises.

    zstandard's stream_reader ends quietly where a cut file ends, which would drop the rest
    of a corpus without a word; each frame's decompressor here must reach the frame's end.
    """

    def __init__(self, raw):
        import zstandard

        super().__init__()
        self._raw, self._error = raw, zstandard.ZstdError
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # opens --long=31 files
        self._frame = None
        self._input, self._output, self._offset = b"", b"", 0

    def readable(self) -> bool:
        """A readable raw stream."""
        return True

    def readinto(self, buffer) -> int:
        """Fill `buffer` with decompressed bytes; 0 at the end of the last frame."""
        while self._offset == len(self._output):
            if not self._decompress_more():
                return 0
        count = min(len(buffer), len(self._output) - self._offset)
        buffer[:count] = self._output[self._offset:self._offset + count]
        self._offset += count
        return count

    def _decompress_more(self) -> bool:
        if not self._input:
            self._input = self._raw.read(READ_BUFFER_BYTES)
            if not self._input:
                if self._frame is not None and not self._frame.eof:
                    raise self._error("the file ends inside a zstd frame")
                return False
        if self._frame is None or self._frame.eof:  # pzstd and concatenated files hold several frames
            self._frame = self._decompressor.decompressobj()
        self._output, self._offset = self._frame.decompress(self._input), 0
        self._input = self._frame.unused_data if self._frame.eof else b""
        return True


def _decompression_errors() -> tuple:
    errors = (OSError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def _compressed_lines(path: str, codec: str, open_stream):
    errors = _decompression_errors()
    number, consumed, pending = 0, 0, 0
    with open(path, "rb") as raw:
        try:
            stream = open_stream(raw)
            for number, line in enumerate(stream, start=1):
                # The compressed position advances a buffer at a time; each line takes what moved.
                position = raw.tell()
                pending += position - consumed
                consumed = position
                if line.strip():
                    yield path, number, line, pending
                    pending = 0
        except errors as error:
            raise DataError(f"{path}:{number + 1}: cannot decompress ({error}); the file is truncated or "
                            f"not {codec}-compressed") from None


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(arrow_type))


def _check_column(path: str, schema, key: str, rows: int) -> None:
    at = f"{path}:row 0" if rows else path
    if key not in schema.names:
        raise DataError(f"{at}: no column {key!r} (found {schema.names}); set --json-key to the text column")
    arrow_type = schema.field(key).type
    if not _is_text_type(arrow_type):
        raise DataError(f"{at}: column {key!r} holds {arrow_type}, expected a string; "
                        f"set --json-key to the text column")


def _parquet_rows(path: str, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        rows = parquet.metadata.num_rows
        _check_column(path, parquet.schema_arrow, key, rows)
        columns = (batch.column(0) for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=[key]))
        yield from _table_rows(path, key, columns, rows)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None


def _arrow_rows(path: str, key: str):
    import pyarrow as pa

    try:
        with pa.memory_map(path) as source:
            try:  # save_to_disk writes the stream format; `.arrow` files elsewhere may be the file format
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
            _check_column(path, table.schema, key, table.num_rows)
            yield from _table_rows(path, key, table.column(key).chunks, table.num_rows)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Arrow IPC file ({error})") from None


def _table_rows(path: str, key: str, arrays, rows: int):
    """(path, row, text, disk_bytes) for the string arrays of one file's column, in row order."""
    import pyarrow.compute as pc

    size = os.path.getsize(path)
    row = accounted = 0
    for array in arrays:
        if array.null_count:
            first = row + pc.index(array.is_null(), True).as_py()
            raise DataError(f"{path}:row {first}: column {key!r} is null, expected a string")
        try:
            texts = array.to_pylist()
        except UnicodeDecodeError:
            raise DataError(f"{path}:rows {row}..{row + len(array) - 1}: column {key!r} holds invalid UTF-8") from None
        if not texts:
            continue
        end = row + len(texts)
        # The file's bytes are shared out by rows; the last row of a batch carries the batch's share.
        disk = size * end // max(rows, 1) - accounted
        accounted += disk
        for index in range(len(texts) - 1):
            yield path, row + index, texts[index], 0
        yield path, end - 1, texts[-1], disk
        row = end

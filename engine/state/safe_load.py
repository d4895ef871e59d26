"""Reading a checkpoint without running code from it.

torch.distributed.checkpoint (DCP) keeps its metadata (`.metadata`) as a pickle, and
`FileSystemReader.read_metadata` unpickles it with `pickle.load`: a crafted file would run its
payload on load, and the SHA-256 manifest does not help (whoever crafts the file writes the
manifest too). Here the metadata is read by `RestrictedUnpickler`, which admits only DCP's own
metadata types (the classes of torch.distributed.checkpoint.metadata and filesystem._StorageInfo)
and the few torch and standard types they are made of (torch.Size, dtypes, layouts, memory formats,
paths); anything else is refused with UnsafeCheckpointError naming the file. Tensors are read by
DCP itself with `torch.load(weights_only=True)`; `SafeLoadPlanner` reads the non-tensor entries
(the trainer state, a JSON string) the same way, where DCP's DefaultLoadPlanner would use
`weights_only=False`. Every load of a checkpoint (resume, rewind, init_from, branch_from, export)
goes through `safe_load`.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, set_element  # the one it uses
from torch.distributed.checkpoint.filesystem import FileSystemReader

from engine.state.errors import CheckpointError, UnsafeCheckpointError

METADATA_FILE = ".metadata"
_METADATA_MODULE = dcp_metadata.__name__
_ADMITTED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by its name, e.g. 'torch.strided'
    ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


@contextlib.contextmanager
def single_process_quietly():
    """Silence DCP's warning that a one-process save/load is one process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP metadata objects and nothing else (no function is callable
    but the constructors of those types)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if module == _METADATA_MODULE:
            found = getattr(dcp_metadata, name, None)
            if isinstance(found, type) and found.__module__ == _METADATA_MODULE:
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        elif (module, name) in _ADMITTED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused: it asks to load {module}.{name}, which is not one of DCP's metadata "
            f"types (a checkpoint file that would run code when read is never loaded)")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source}: refused: it holds a persistent reference ({pid!r})")


def read_metadata(checkpoint: str | Path, name: str = METADATA_FILE) -> dcp_metadata.Metadata:
    """DCP's metadata of a checkpoint directory, unpickled by RestrictedUnpickler."""
    path = Path(checkpoint) / name
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read {name} ({err.strerror or err})") from None
    try:
        metadata = RestrictedUnpickler(io.BytesIO(raw), str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated or garbled bytes: corrupt, not dangerous
        raise CheckpointError(f"{path}: not a DCP metadata file ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{path}: refused: it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with the metadata read by `read_metadata` (once, then reused)."""

    def __init__(self, path: str | Path, metadata: Optional[dcp_metadata.Metadata] = None):
        super().__init__(str(path))
        self._metadata = metadata if metadata is not None else read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        """The checkpoint's metadata (DCP asks every rank; none unpickles the file itself)."""
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        """Set the entry `read_item` names to the object in `value` (a str, numbers, containers)."""
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = getattr(info, "relative_path", "a data file")
            raise UnsafeCheckpointError(f"{where}: refused: entry {read_item.dest_index.fqn!r} is not plain data "
                                        f"({str(err).splitlines()[0]})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _first_failure(err: CheckpointException) -> BaseException:
    failures = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
    unsafe = [f for f in failures if isinstance(f, UnsafeCheckpointError)]
    return (unsafe or failures or [err])[0]


def safe_load(state_dict: dict, checkpoint: str | Path, process_group=None, no_dist: bool = False,
              metadata: Optional[dcp_metadata.Metadata] = None) -> None:
    """dcp.load of `state_dict` from `checkpoint` (missing keys left as they are) without
    unpickling anything beyond DCP's metadata types and plain data."""
    reader = SafeFileSystemReader(checkpoint, metadata)
    try:
        with single_process_quietly():
            dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True),
                     process_group=process_group, no_dist=no_dist)
    except CheckpointException as err:  # DCP gathers every rank's failure
        cause = _first_failure(err)
        if isinstance(cause, CheckpointError):
            prefix = "" if str(checkpoint) in str(cause) else f"checkpoint {checkpoint}: "
            raise type(cause)(f"{prefix}{cause}") from None
        if isinstance(cause, pickle.UnpicklingError):
            raise UnsafeCheckpointError(f"checkpoint {checkpoint}: refused: a data file is not plain tensors "
                                        f"({str(cause).splitlines()[0]})") from None
        raise CheckpointError(f"checkpoint {checkpoint}: loading failed ({type(cause).__name__}: {cause})") from None

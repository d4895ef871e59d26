"""What can go wrong with a checkpoint, as exception types the runner maps to exit statuses.

CheckpointError (exit 2): a checkpoint cannot be used or written as asked, the message names the
path and the reason. UnsafeCheckpointError (exit 2): a file of the checkpoint would run code if
loaded, so it is refused. StorageError (STORAGE_FAILED, never restarted): the storage refused a
write, disk full or read-only (engine/state/storage.py).
"""
from __future__ import annotations

from typing import Optional


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something that loading would execute (a pickle beyond DCP's types)."""


class StorageError(CheckpointError):
    """The storage refused a write (one line: what, where, bytes needed and free); not restartable."""

    def __init__(self, message: str, path: Optional[str] = None, needed: Optional[int] = None,
                 free: Optional[int] = None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free

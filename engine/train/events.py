"""events.jsonl: one JSON object per run event (start, checkpoint_saved, failure, restart, ...).

Events are appended by whichever rank (on whichever node) observes them, with its rank in the
record, and reach the file at once, so that a crash right after an event still leaves it on disk
for the next attempt to read. Each line is one write() on an O_APPEND descriptor, so lines from
several processes never interleave. A process that dies mid-write (or a full disk) can leave a
torn line: the next writer starts on a fresh line, and the reader skips a line it cannot parse
with a note, so a torn line never stops a restart.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.state.storage import storage_cause, storage_error
from engine.run_files import open_run_file


class EventLog:
    """Append-only events.jsonl in the run directory; safe to share between processes (O_APPEND)."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / "events.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._noted: set[int] = set()  # torn lines already reported by this reader

    def record(self, type: str, **fields: Any) -> dict:
        """Append one event with its type, this rank and the wall time; returns the record.

        A write the storage refuses raises StorageError (engine/state/storage.py)."""
        event = {"type": type, "rank": self.rank, "time": time.time(), **fields}
        line = (json.dumps(event) + "\n").encode()
        try:
            # O_APPEND, and never through a symlink planted in its place (RunFileError, exit 2)
            fd = open_run_file(self.path, readable=True)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line before us: end it first
                    line = b"\n" + line
                written = os.write(fd, line)  # one write(): never interleaved with another process's line
                if written < len(line):  # the file system ran out of room mid-line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            finally:
                os.close(fd)
        except OSError as err:
            cause = storage_cause(err)
            if cause is None:
                raise
            raise storage_error(cause, f"recording a {type!r} event", self.path, len(line)) from None
        return event

    def read(self) -> list[dict]:
        """All events recorded so far (by any rank, any attempt); unreadable lines are skipped with a note."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        events = []
        lines = raw.split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                event = None
            if isinstance(event, dict):
                events.append(event)
            elif number not in self._noted:
                self._noted.add(number)
                where = "last line" if all(not rest.strip() for rest in lines[number:]) else f"line {number}"
                print(f"apogee: note: {self.path} {where} is torn or unreadable (a writer died mid-line?): "
                      f"skipped ({line[:60]!r})", file=sys.stderr, flush=True)
        return events

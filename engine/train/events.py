"""events.jsonl: one JSON object per run event (start, checkpoint_saved, failure, restart, ...).

Events are appended by whichever rank observes them (with its rank in the record) and flushed at
once, so that a crash right after an event still leaves it on disk for the next attempt to read.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from engine.run_files import open_run_file


class EventLog:
    """Append-only events.jsonl in the run directory; safe to share between processes (O_APPEND)."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / "events.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def record(self, type: str, **fields: Any) -> dict:
        """Append one event with its type, this rank and the wall time; returns the record."""
        event = {"type": type, "rank": self.rank, "time": time.time(), **fields}
        line = (json.dumps(event) + "\n").encode()
        # One write() on an O_APPEND descriptor: lines from several ranks never interleave.
        fd = open_run_file(self.path)  # O_APPEND, and never through a symlink planted in its place
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return event

    def read(self) -> list[dict]:
        """All events recorded so far (by any rank, any attempt)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

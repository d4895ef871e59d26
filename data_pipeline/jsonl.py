"""Reading JSONL example files (SFT, preference pairs, RL prompts) with errors that name file:line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data_pipeline import DataError


def jsonl_records(paths, option: str, expected: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of the JSONL files `paths`, where = "file:line".

    option names the config key that listed the files and expected describes a line, for the
    errors: a missing file, a line that is not JSON or not a JSON object.
    """
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{option}: {str(path)!r} is not a file (expected JSONL: {expected})")
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
                yield where, record

"""Inputs known by name (`data.inputs=[stdlib]`, `apogee preprocess --input stdlib`): corpora every machine has.

The default corpus, 'stdlib', is the running interpreter's own standard library: every *.py
file under sysconfig's stdlib directory, sorted, without site-packages/dist-packages, test
directories (test, tests, idle_test) and __pycache__. It is real text present on every machine
(about 12 MB / 730 files on CPython 3.11), so a run works offline with no download.
"""
from __future__ import annotations

import os
import sysconfig

from data_pipeline import DataError

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
NAMED_INPUTS = ("stdlib",)


def stdlib_files() -> list:
    """Sorted paths of the interpreter's standard-library *.py files (tests and packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        files.extend(os.path.join(directory, name) for name in sorted(names) if name.endswith(".py"))
    return files


def named_input_files(name: str) -> list:
    """The files of a named input (see NAMED_INPUTS)."""
    if name == "stdlib":
        return stdlib_files()
    raise DataError(f"input {name!r}: not a named input; valid names are {list(NAMED_INPUTS)}")

"""Nodes whose ranks were confirmed faulty, recorded in the run directory so the next job avoids them.

A rank named in `sdc_confirmed` (the step guard: its replay diverged, or its GEMM broke an ABFT
checksum) appends its node to RUN_DIR/faulty_nodes.jsonl, one fsynced JSON line per confirmation:

    {"node": "gpu-017", "rank": 3, "step": 1200, "detector": "abft", "time": ...}

One confirmation may be a transient (a cosmic ray); a node confirmed PERSISTENT times is a
failing unit: `excluded_nodes(run_dir)` lists it, `apogee submit` passes it to sbatch as
`--exclude` (slurm/submit.py, visible in `--dry-run`), and the batch script sets the job's
excluded nodes before it requeues itself (slurm/apogee.sbatch). The node is Slurm's name for it
(SLURMD_NODENAME) under Slurm, the host name elsewhere.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional

from engine.run_files import open_run_file

FILE = "faulty_nodes.jsonl"
"""The record's file name in the run directory."""

PERSISTENT = 2
"""Confirmations on one node that make it excluded (1 could be a transient upset)."""


def this_node(env: Optional[Mapping[str, str]] = None) -> str:
    """Slurm's name of this node (what --exclude takes), else the host name."""
    env = os.environ if env is None else env
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def record_faulty(run_dir: Path | str, rank: int, step: int, detector: str, node: Optional[str] = None) -> int:
    """Append one confirmation of this rank's node; returns how many the node has now."""
    node = node or this_node()
    line = json.dumps({"node": node, "rank": rank, "step": step, "detector": detector, "time": time.time()})
    fd = open_run_file(Path(run_dir) / FILE)  # O_APPEND, never through a planted symlink
    try:
        os.write(fd, ("\n" + line + "\n").encode())  # one write; a leading newline ends a torn line
        os.fsync(fd)
    finally:
        os.close(fd)
    return confirmations(run_dir)[node]


def confirmations(run_dir: Path | str) -> Counter:
    """{node: confirmations} from the record (none when it does not exist; a torn last line is skipped)."""
    path = Path(run_dir) / FILE
    counts: Counter = Counter()
    if not path.is_file():
        return counts
    for text in path.read_text().splitlines():
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:  # a rank killed mid-write: the line never completed
            continue
        if isinstance(entry, dict) and isinstance(entry.get("node"), str):
            counts[entry["node"]] += 1
    return counts


def excluded_nodes(run_dir: Path | str) -> list[str]:
    """Nodes confirmed faulty at least PERSISTENT times, sorted."""
    return sorted(node for node, n in confirmations(run_dir).items() if n >= PERSISTENT)

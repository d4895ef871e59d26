"""manifest.json: what a published checkpoint holds (every file's size and SHA-256, and which rank
wrote it), how it is hashed when written and how it is verified when read.

Format 2 (this version), one JSON object:

    {"format": 2, "step": 120, "metadata": {...run, model, layout...},
     "files": {"__0_0.distcp": {"bytes": 123, "sha256": "ab..", "rank": 0}, ".metadata": {...}, ...}}

Each rank hashes the files it wrote, in its checkpoint thread, in parallel with the other ranks;
rank 0 merges the digests into the manifest. Verifying costs each rank about its own bytes: the
files are shared out by the rank that wrote them (`verification_share`), each rank checks its
share and the answers are combined. Format 1 (before the per-rank digests) has no "format" and no
"rank" per file; it is read the same way, its files shared out by size.

A manifest that cannot be parsed or lacks a field (bad bytes, `{}`, a file entry without its
checksum) makes the checkpoint "not intact": `parse_manifest` raises ManifestError with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22  # 4 MiB: one progress beat per chunk hashed


class ManifestError(ValueError):
    """A manifest that cannot be trusted to describe its checkpoint; the message is the reason."""


def no_progress() -> None:
    """The default progress callback: nothing to tell."""


def file_sha256(path: str | Path, progress: Callable[[], None] = no_progress) -> str:
    """Hex SHA-256 of a file's bytes; `progress` is called after every 4 MiB (watchdog beats)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)  # hashlib releases the GIL on large blocks: threads hash in parallel
            progress()
    return digest.hexdigest()


def hash_files(root: Path, names: Iterable[str], rank: int,
               progress: Callable[[], None] = no_progress) -> dict[str, dict]:
    """{name: {bytes, sha256, rank}} of the files `rank` wrote under `root`, hashed in parallel."""
    names = sorted(set(names))

    def one(name: str) -> tuple[str, dict]:
        path = root / name
        return name, {"bytes": path.stat().st_size, "sha256": file_sha256(path, progress), "rank": rank}

    if len(names) <= 1:
        return dict(map(one, names))
    with ThreadPoolExecutor(max_workers=min(4, len(names)), thread_name_prefix="checkpoint-hash") as pool:
        return dict(pool.map(one, names))


def manifest_text(step: int, metadata: dict, files: dict[str, dict]) -> str:
    """The manifest of a checkpoint of `step` holding `files` (merged digests of every rank)."""
    return json.dumps({"format": FORMAT_VERSION, "step": step, "metadata": metadata,
                       "files": dict(sorted(files.items()))}, indent=1)


def _check_name(name) -> None:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST:
        raise ManifestError(f"file entry {name!r} is not a file inside the checkpoint")


def parse_manifest(raw: bytes) -> dict:
    """The manifest in `raw`, checked field by field; ManifestError says what is wrong."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"manifest.json is not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"manifest.json holds a {type(manifest).__name__}, not an object")
    version = manifest.get("format", 1)
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"manifest.json format={version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise ManifestError(f"manifest.json is format {version}, newer than this Apogee reads ({FORMAT_VERSION})")
    missing = [key for key in ("step", "metadata", "files") if key not in manifest]
    if missing:
        raise ManifestError(f"manifest.json lacks {', '.join(missing)}")
    if not isinstance(manifest["step"], int) or isinstance(manifest["step"], bool) or manifest["step"] < 0:
        raise ManifestError(f"manifest.json step={manifest['step']!r} is not a step number")
    if not isinstance(manifest["metadata"], dict):
        raise ManifestError("manifest.json metadata is not an object")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ManifestError("manifest.json lists no files")
    for name, entry in files.items():
        _check_name(name)
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest.json entry of {name} is not an object")
        size, digest, owner = entry.get("bytes"), entry.get("sha256"), entry.get("rank", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"manifest.json gives {name} no size (bytes={size!r})")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"manifest.json gives {name} no SHA-256 (sha256={digest!r})")
        if not isinstance(owner, int) or isinstance(owner, bool) or owner < 0:
            raise ManifestError(f"manifest.json gives {name} rank={owner!r}")
    manifest["format"] = version
    return manifest


def load_manifest(directory: str | Path) -> dict:
    """The parsed manifest of a checkpoint directory (ManifestError if absent or corrupt)."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError("no manifest.json (the save did not finish)") from None
    except OSError as err:
        raise ManifestError(f"manifest.json cannot be read ({err.strerror or err})") from None
    return parse_manifest(raw)


def check_sizes(directory: str | Path, manifest: dict) -> Optional[str]:
    """None if every listed file is present with its size (no hashing), else the first problem."""
    directory = Path(directory)
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            return f"missing file {name}"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
    return None


def verify_files(directory: str | Path, manifest: dict, names: Iterable[str],
                 progress: Callable[[], None] = no_progress) -> Optional[str]:
    """None if the files `names` of the manifest are present, sized and hashed as listed."""
    directory = Path(directory)
    subset = {name: manifest["files"][name] for name in names}
    problem = check_sizes(directory, {"files": subset})
    if problem is not None:
        return problem
    for name, entry in sorted(subset.items()):
        if file_sha256(directory / name, progress) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def verification_share(manifest: dict, rank: int, world_size: int) -> list[str]:
    """The files `rank` of `world_size` verifies; every rank computes the same split.

    A rank verifies the files written by the rank of its own number (when the manifest names
    every writer and the writers fit in this world: each rank about its own bytes); otherwise the
    files are dealt out largest first to the least loaded rank.
    """
    files = manifest["files"]
    owners = [entry.get("rank") for entry in files.values()]
    if world_size == 1:
        return sorted(files)
    if manifest.get("format", 1) >= 2 and all(o is not None and o < world_size for o in owners):
        return sorted(name for name, entry in files.items() if entry["rank"] == rank)
    load, share = [0] * world_size, [[] for _ in range(world_size)]
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        least = min(range(world_size), key=lambda r: (load[r], r))
        load[least] += files[name]["bytes"]
        share[least].append(name)
    return sorted(share[rank])


def total_bytes(manifest: dict) -> int:
    """Bytes of every file the manifest lists (what a checkpoint like it needs on disk)."""
    return sum(entry["bytes"] for entry in manifest["files"].values()) + len(json.dumps(manifest))


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path (a directory: so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

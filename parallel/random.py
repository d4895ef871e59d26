"""RNG streams derived from (seed, step, role, coordinates), instead of a global RNG tracker.

Megatron keeps a global CUDA RNG tracker and forks it around tensor-parallel regions. Here a
random stream is a pure function of what it is for: `derive_seed` hashes the parts with
SHA-256 (stable across processes, machines and Python versions, unlike `hash()`), and each use
builds its own `torch.Generator` from that seed. So a step replays exactly (contract 3), and
whether two ranks draw the same numbers is decided by which coordinates go into the key:

- replicated: same on all TP peers (the computation is duplicated there, e.g. dropout on the
  replicated hidden state), distinct across the ranks that hold different data or layers;
- sharded: distinct on every rank, in particular across TP peers (e.g. dropout on a sharded
  activation, where each rank owns different elements).

Weight init does not come through here with coordinates: a parameter's full value depends only
on (seed, name), drawn in tiles seeded with `derive_seed(seed, "init", name, tile row, tile column)`
(parallel/tiled_random.py), so each rank draws only the tiles of its shard.
"""
from __future__ import annotations

import hashlib
import struct

import torch

from .topology import ParallelContext


def _encode(part) -> bytes:
    # Each part is tagged with its type and length, so ("ab", "c") and ("a", "bc"), or 1 and "1",
    # never hash alike.
    if isinstance(part, bool):
        tag, body = b"b", b"1" if part else b"0"
    elif isinstance(part, int):
        tag, body = b"i", str(part).encode()
    elif isinstance(part, str):
        tag, body = b"s", part.encode("utf-8")
    elif isinstance(part, bytes):
        tag, body = b"y", part
    elif isinstance(part, float):
        tag, body = b"f", part.hex().encode()
    else:
        raise TypeError(f"derive_seed parts must be int, str, bytes, float or bool, got {type(part).__name__}: {part!r}")
    return tag + struct.pack("<Q", len(body)) + body


def derive_seed(*parts) -> int:
    """A 64-bit seed (0 <= seed < 2**64) that depends only on `parts`, stably across runs and machines."""
    digest = hashlib.sha256(b"".join(_encode(p) for p in parts)).digest()
    return int.from_bytes(digest[:8], "little")


def generator(seed: int, *keys, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with derive_seed(seed, *keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def replicated_generator(ctx: ParallelContext, seed: int, step: int, role: str, *,
                         data_dependent: bool = True, device: torch.device | str | None = None) -> torch.Generator:
    """Same stream on all TP peers; distinct across cp, dp and pp positions.

    With data_dependent=False (e.g. anything drawn before data enters) the stream depends only
    on (seed, step, role) and is the same on every rank.
    """
    keys: tuple = ("replicated", step, role)
    if data_dependent:
        c = ctx.coords
        keys += ("cp", c["cp"], "dp", c["dp"], "pp", c["pp"])
    return generator(seed, *keys, device=ctx.device if device is None else device)


def sharded_generator(ctx: ParallelContext, seed: int, step: int, role: str, *,
                      device: torch.device | str | None = None) -> torch.Generator:
    """A stream distinct on every rank, in particular across TP peers (they own different elements)."""
    c = ctx.coords
    keys = ("sharded", step, role, "tp", c["tp"], "cp", c["cp"], "dp", c["dp"], "pp", c["pp"])
    return generator(seed, *keys, device=ctx.device if device is None else device)

"""Normal draws of any slice of a global tensor, seeded tile by tile, so a shard can be drawn alone.

A global tensor of shape [R, C] is cut into fixed tiles of TILE_ROWS x TILE_COLS (a 1-D tensor is a
column [R, 1]); the tile grid depends on the global shape only,
never on the layout. Tile (i, j) holds the normals of its own generator, seeded with
derive_seed(seed, *key, i, j) (parallel/random.py), drawn in fp32 on the CPU. So the value of
element (r, c) is a function of (seed, key, global shape, r, c) alone, and a rank that holds rows
[r0, r1) x columns [c0, c1) draws only the tiles that slice touches (Megatron's per-shard init, with
the layout-invariance of its `--use-cpu-initialization` path). Drawing on the CPU keeps the values
the same on every device; they reach the destination one row block at a time, so the host never
holds more than TILE_ROWS rows of the slice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .random import generator

TILE_ROWS = 128
"""Rows of one tile (dimension 0 of the global tensor)."""

TILE_COLS = 128
"""Columns of one tile (dimension 1)."""


def slice_bounds(global_shape: Sequence[int], shard) -> list[tuple[int, int]]:
    """[start, stop) along every dimension of the slice `shard` = (dim, rank, world) holds (None: all),
    for torch.chunk's equal chunks (the rule of parallel/sharding.py)."""
    bounds = [(0, size) for size in global_shape]
    if shard is not None:
        dim, rank, world = shard
        size = global_shape[dim]
        if size % world:
            raise ValueError(f"dimension {dim} of a tensor of shape {tuple(global_shape)} ({size}) is not "
                             f"divisible into {world} equal shards")
        step = size // world
        bounds[dim] = (rank * step, (rank + 1) * step)
    return bounds


@torch.no_grad()
def normal_slice_(out: Tensor, global_shape: Sequence[int], bounds: Sequence[tuple[int, int]], std: float,
                  seed: int, *key) -> Tensor:
    """Fill `out` (a 1-D or 2-D tensor on any device, any dtype) with the slice `bounds` of the global
    N(0, std^2) tensor of (seed, key, global_shape); returns `out`. The global tensor is never built."""
    if len(global_shape) not in (1, 2):
        raise ValueError(f"tile-seeded init draws 1-D and 2-D tensors; got shape {tuple(global_shape)}")
    rows, cols = global_shape[0], global_shape[1] if len(global_shape) == 2 else 1
    (r0, r1), (c0, c1) = bounds[0], bounds[1] if len(bounds) == 2 else (0, 1)
    if r1 <= r0 or c1 <= c0:
        return out
    view = out.view(r1 - r0, c1 - c0)
    direct = view.device.type == "cpu" and view.dtype == torch.float32  # tiles straight into `out`
    for i in range(r0 // TILE_ROWS, math.ceil(r1 / TILE_ROWS)):
        tile_r0, tile_r1 = i * TILE_ROWS, min(rows, (i + 1) * TILE_ROWS)
        lo, hi = max(r0, tile_r0), min(r1, tile_r1)
        block = view[lo - r0:hi - r0] if direct else torch.empty(hi - lo, c1 - c0, dtype=torch.float32)
        for j in range(c0 // TILE_COLS, math.ceil(c1 / TILE_COLS)):
            tile_c0, tile_c1 = j * TILE_COLS, min(cols, (j + 1) * TILE_COLS)
            tile = torch.empty(tile_r1 - tile_r0, tile_c1 - tile_c0, dtype=torch.float32)
            tile.normal_(0.0, std, generator=generator(seed, *key, i, j))
            left, right = max(c0, tile_c0), min(c1, tile_c1)
            block[:, left - c0:right - c0] = tile[lo - tile_r0:hi - tile_r0, left - tile_c0:right - tile_c0]
        if not direct:  # one row block to the device (and its dtype) at a time
            view[lo - r0:hi - r0].copy_(block)
    return out


def normal_full(global_shape: Sequence[int], std: float, seed: int, *key) -> Tensor:
    """The whole global tensor of (seed, key, global_shape) in fp32 on the CPU (tests, references)."""
    out = torch.empty(*global_shape)
    return normal_slice_(out, global_shape, slice_bounds(global_shape, None), std, seed, *key)

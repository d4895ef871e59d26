"""Which slice of a global parameter this rank holds: the one rule init, checkpoints and exports share.

A tensor-parallel layer marks its sharded weights `param.tp_shard = (dim, rank, world)`; expert
parallelism marks the stacked expert weights `param.ep_shard = (dim, rank, world)`. Either way
the local tensor is chunk `rank` of `world` equal chunks of the global tensor along `dim`. A
parameter carries at most one of the two (expert tensor parallelism is not implemented).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

TP_SHARD = "tp_shard"
"""Attribute of a tensor-parallel shard: (dim, rank in the TP group, TP size)."""

EP_SHARD = "ep_shard"
"""Attribute of an expert-parallel shard: (dim, rank in the EP group, EP size)."""


def shard_of(param: nn.Parameter) -> Optional[tuple[int, int, int]]:
    """(dim, rank, world) of the slice `param` holds, or None when it holds the whole tensor."""
    tp = getattr(param, TP_SHARD, None)
    return tp if tp is not None else getattr(param, EP_SHARD, None)


def is_expert_shard(param: nn.Parameter) -> bool:
    """True for an expert-parallel slice (its gradient reduces over expert-dp, its norm sums over ep)."""
    return getattr(param, EP_SHARD, None) is not None

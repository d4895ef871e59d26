"""Every collective Apogee issues, in one place, each recording its payload in a comm ledger.

A `Group` names one process group of this rank ('tp', 'dp', ...) and carries the ledger, so a
call reads like the paper: `all_reduce(grads, dp)`. The ledger counts payload bytes (the size of
the tensor handed to the collective, before the backend's ring or tree schedule), which is the
quantity the formulas in Megatron's and ZeRO's papers count; tests compare the two exactly.

A group of size 1 makes every function here a no-op (nothing recorded), so single-rank code paths
run the same lines as parallel ones.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class CommLedger:
    """Bytes moved per (group name, operation), accumulated until `reset()`."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def record(self, group: str, op: str, nbytes: int) -> None:
        """Add one collective's payload."""
        self.bytes[(group, op)] += nbytes
        self.calls[(group, op)] += 1

    def total(self, group: Optional[str] = None, op: Optional[str] = None) -> int:
        """Bytes summed over the entries matching `group` and/or `op` (None matches all)."""
        return sum(n for (g, o), n in self.bytes.items() if (group is None or g == group) and (op is None or o == op))

    def summary(self) -> dict:
        """{'group/op': bytes} for logging."""
        return {f"{g}/{o}": n for (g, o), n in sorted(self.bytes.items())}

    def reset(self) -> None:
        """Start a new accounting period (the trainer resets once per step)."""
        self.bytes.clear()
        self.calls.clear()


@dataclass
class Group:
    """One of this rank's process groups, by name, with its size, this rank's index and the ledger."""

    name: str
    process_group: Optional[dist.ProcessGroup]
    size: int
    rank: int
    ledger: CommLedger

    def _record(self, op: str, tensor: torch.Tensor) -> None:
        self.ledger.record(self.name, op, tensor.numel() * tensor.element_size())


def all_reduce(tensor: torch.Tensor, group: Group, async_op: bool = False, op=dist.ReduceOp.SUM,
               purpose: str = "all_reduce"):
    """In-place sum (by default) of `tensor` over the group; returns a work handle when async.

    `purpose` is the ledger key: metric reductions (loss, token counts) are booked apart from the
    gradient traffic that the formulas count.
    """
    if group.size == 1:
        return None
    group._record(purpose, tensor)
    return dist.all_reduce(tensor, op=op, group=group.process_group, async_op=async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: Group, async_op: bool = False):
    """output (1/size of input, dim 0) = this rank's chunk of the sum of `input` over the group."""
    if group.size == 1:
        output.copy_(input)
        return None
    group._record("reduce_scatter", input)
    return dist.reduce_scatter_tensor(output, input, group=group.process_group, async_op=async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, group: Group, async_op: bool = False):
    """output (size x input, dim 0) = every rank's `input`, concatenated in rank order."""
    if group.size == 1:
        output.copy_(input)
        return None
    group._record("all_gather", output)
    return dist.all_gather_into_tensor(output, input, group=group.process_group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src_index: int, group: Group, global_src: int):
    """Copy `tensor` from the group member at `src_index` (global rank `global_src`) to all."""
    if group.size == 1:
        return None
    group._record("broadcast", tensor)
    return dist.broadcast(tensor, src=global_src, group=group.process_group)

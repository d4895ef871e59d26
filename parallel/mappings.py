"""The autograd mappings of Megatron's tensor and sequence parallelism, and of expert dispatch.

Shoeybi et al. 2019 ("f" and "g") and Korthikanti et al. 2022 (sequence parallelism), named after
what they do. Each is a pair of collectives of parallel/collectives.py, one in forward and its
conjugate in backward:

    copy_to_tp_region                           f: identity        | all-reduce
    reduce_from_tp_region                       g: all-reduce      | identity
    scatter_to_sequence_parallel_region            split sequence  | all-gather sequence
    gather_from_sequence_parallel_region           all-gather seq. | reduce-scatter sequence
    reduce_scatter_to_sequence_parallel_region     reduce-scatter  | all-gather sequence
    all_to_all_autograd                            all-to-all      | all-to-all, splits swapped

Activations are [batch, seq, hidden], so "the sequence" is dim 1. A group of size 1 makes each
mapping the identity.
"""
from __future__ import annotations

import torch

from parallel.collectives import Group, all_gather_along, all_reduce, all_to_all, reduce_scatter_along, split_along



class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # all_reduce works in place, and autograd may hand the same gradient tensor to other
        # consumers (a residual add passes one tensor to both branches): reduce a copy.
        grad = grad.clone(memory_format=torch.contiguous_format)
        all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        all_reduce(out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 1, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        # The gathered tensor feeds tensor-parallel layers, so each rank's gradient is a partial
        # sum over its shard of heads/columns: sum them and keep this rank's sequence chunk.
        return reduce_scatter_along(grad, 1, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce of the gradient backward (enters a TP region)."""
    return x if group.size == 1 else _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Megatron's g: all-reduce forward (sums partial outputs), identity backward (leaves a TP region)."""
    return x if group.size == 1 else _ReduceFromTPRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (dim 1); backward all-gathers the gradient."""
    return x if group.size == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """SP's f: all-gather the sequence (dim 1) forward, reduce-scatter the gradient backward."""
    return x if group.size == 1 else _GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """SP's g: reduce-scatter partial sums along the sequence (dim 1) forward, all-gather backward."""
    return x if group.size == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, purpose):
        ctx.splits, ctx.group, ctx.purpose = (out_splits, in_splits), group, purpose
        return all_to_all(x, out_splits, in_splits, group, purpose)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        # The gradient of every received row goes back to the member that sent it.
        return all_to_all(grad, in_splits, out_splits, ctx.group, ctx.purpose), None, None, None, None


def all_to_all_autograd(x: torch.Tensor, out_splits: list, in_splits: list, group: Group,
                        purpose: str = "all_to_all") -> torch.Tensor:
    """`all_to_all` whose backward sends each row's gradient back the same way (splits swapped)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, purpose)

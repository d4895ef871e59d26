"""Deliberate layout bugs, to show that the measured parity tolerances catch real ones.

Each bug is a function of a freshly built trainer returning a context manager, inside which the
trainer runs its steps (tests/parity.py `train_layouts(..., bugs=...)`); it is applied inside the
spawned ranks and leaves the other layouts of the spawn untouched.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch


@contextlib.contextmanager
def one_gradient_bucket_not_reduced(trainer):
    """DP: the all-reduce of one gradient bucket (the middle one of the buffer) is never issued,
    so that bucket's parameters step with each rank's local gradient, as if a bucket's hook were lost."""
    from parallel import data_parallel

    skipped = trainer.grads.buckets[len(trainer.grads.buckets) // 2]
    real = data_parallel.all_reduce

    def all_reduce(tensor, group, *args, **kwargs):
        if tensor.data_ptr() == skipped.data.data_ptr() and tensor.numel() == skipped.data.numel():
            return None  # no handle: GradBuffer.finish() has nothing to wait for
        return real(tensor, group, *args, **kwargs)

    with mock.patch.object(data_parallel, "all_reduce", all_reduce):
        yield


@contextlib.contextmanager
def wrong_tensor_parallel_shard(trainer, name: str = "layers.1.mlp.down_proj.weight"):
    """TP: every rank starts from TP rank 0's slice of one row-parallel weight (a shard loaded from
    the wrong offset), the other weights are right."""
    from parallel.collectives import all_gather_along

    param = dict(trainer.named_parameters())[name]
    dim = param.tp_shard[0]
    with torch.no_grad():
        first = all_gather_along(param.detach(), dim, trainer.tp, purpose="layout_bug").chunk(trainer.tp.size, dim)[0]
        param.copy_(first)
    trainer.optimizer.sync_masters_from_params()
    yield

"""The gradient synchronisation + optimizer pair that `parallel.zero` selects, behind one interface.

    grads, optimizer = build_grad_sync(cfg, chunks, dp_group, counts_in_norm(ctx), tp_group)

`grads` has start_step(), is_last_microbatch, finish() (and num_bytes, buckets); `optimizer` has
step(lr, grad_norm_sq_reduce) -> grad norm, state_dict()/load_state_dict() and
sharded_state_dict(). Stage 0 is plain data parallelism (GradBuffer + MasterWeightOptimizer);
stages 1-2 shard the optimizer state and gradients (parallel/zero.py); stage 3 also the
parameters (parallel/zero3.py). The group is an argument, so the DP group can become 'dp-cp'.

`memory_bytes(grads, optimizer)` gives the per-rank bytes of parameters, gradients and optimizer
state for every stage; the trainer logs them. `sharded_optimizer_state(optimizer)` gives the
optimizer state in the sharded form of every stage (a stage-0 rank owns every parameter whole).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from engine.config import ApogeeConfig
from engine.train.optim import MasterWeightOptimizer
from parallel.collectives import Group
from parallel.data_parallel import GradBuffer
from parallel.sharding import is_expert_shard
from parallel.zero import ShardedGradBuffer, unique_trainable
from parallel.zero3 import ShardedParameters
from parallel.zero_optimizer import ADAM_STATE_KEYS, FlatShard, ShardedOptimizer


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""optim.grad_reduce_dtype -> the dtype gradient buckets travel in (ZeRO-3 reduces in fp32)."""


def _named_parameters(chunks: list[nn.Module]):
    for chunk in chunks:
        yield from chunk.named_parameters()


def build_grad_sync(cfg: ApogeeConfig, chunks: list[nn.Module], group: Group,
                    counts_in_norm: Optional[Callable] = None, tp_group: Optional[Group] = None,
                    expert_group: Optional[Group] = None):
    """(gradient synchronisation, optimizer) for cfg.parallel.zero over `group`.

    Expert-parallel weights reduce over `expert_group` instead (stage 0 only: validation refuses
    ZeRO with ep > 1).
    """
    stage = cfg.parallel.zero
    bucket_bytes = int(cfg.parallel.grad_bucket_mb * 2**20)
    reduce_dtype = REDUCE_DTYPES[cfg.optim.grad_reduce_dtype]
    if stage == 0:
        group_of = None
        if expert_group is not None:
            group_of = lambda p: expert_group if is_expert_shard(p) else group  # noqa: E731
        grads = GradBuffer(_named_parameters(chunks), group, bucket_bytes=bucket_bytes, group_of=group_of,
                           reduce_dtype=reduce_dtype)
        return grads, MasterWeightOptimizer(_named_parameters(chunks), cfg.optim, counts_in_norm, group.device)
    if stage in (1, 2):
        grads = ShardedGradBuffer(_named_parameters(chunks), group, stage, bucket_bytes=bucket_bytes,
                                  reduce_dtype=reduce_dtype, overlap_param_gather=cfg.parallel.overlap_param_gather)
        if cfg.parallel.overlap_param_gather:
            grads.install_forward_waits(chunks)
        pieces = [(s, grads.param_shard(s), grads.grad_shard(s)) for s in grads.segments]
        return grads, ShardedOptimizer(pieces, cfg.optim, group, counts_in_norm, tp_group,
                                       after_step=grads.all_gather_params, memory=grads.memory_bytes)
    if stage == 3:
        grads = ShardedParameters(chunks, group)
        pieces = [(s, grads.param_shard(s), grads.grad_shard(s)) for s in grads.segments]
        return grads, ShardedOptimizer(pieces, cfg.optim, group, counts_in_norm, tp_group,
                                       memory=grads.memory_bytes)
    raise ValueError(f"parallel.zero={stage}: expected 0, 1, 2 or 3")


def memory_bytes(grads, optimizer) -> dict:
    """{'params', 'grads', 'optimizer'}: this rank's persistent bytes of each (transient buffers
    of gathered parameters or in-flight gradient buckets are not counted)."""
    if hasattr(optimizer, "memory_bytes"):
        return optimizer.memory_bytes()
    params = unique_trainable(zip(optimizer.names, optimizer.params))
    state = 0
    for p, master in zip(optimizer.params, optimizer.masters):
        if p is not master:
            state += master.numel() * master.element_size()
        for key in ADAM_STATE_KEYS:
            value = optimizer.optimizer.state.get(master, {}).get(key)
            if value is not None:
                state += value.numel() * value.element_size()
    return {"params": sum(p.numel() * p.element_size() for _, p in params),
            "grads": grads.num_bytes, "optimizer": state}


def sharded_optimizer_state(optimizer) -> dict:
    """The optimizer state as {param name: {'master', 'exp_avg', 'exp_avg_sq': FlatShard, 'step'}}.

    ZeRO optimizers give their pieces; a stage-0 MasterWeightOptimizer gives every parameter
    whole (offset 0), so a checkpoint handles every stage the same way.
    """
    if hasattr(optimizer, "sharded_state_dict"):
        return optimizer.sharded_state_dict()
    out = {}
    for name, master in zip(optimizer.names, optimizer.masters):
        shape = tuple(master.shape)
        entry = {"master": FlatShard(shape, 0, master.detach().reshape(-1))}
        state = optimizer.optimizer.state.get(master, {})
        for key in ADAM_STATE_KEYS:
            if key in state:
                entry[key] = FlatShard(shape, 0, state[key].reshape(-1))
        if "step" in state:
            entry["step"] = float(state["step"])
        out[name] = entry
    return out

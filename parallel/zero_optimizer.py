"""AdamW over this rank's flat shard of the parameters: the optimizer half of ZeRO (stages 1-3).

A shard holds pieces of parameters (`zero.Segment`s: a flat range of one parameter, possibly cut
in the middle), so every per-parameter rule is applied per piece: each piece is one tensor in
torch's (fused) AdamW, in the weight-decay group of its parameter (matrices decay; norms and
biases, ndim < 2, do not), and counts in the gradient norm when its parameter does. fp32
parameters are their own masters (the piece is a view of the parameter storage, so Adam updates
it in place); other dtypes get an fp32 master piece, rounded into the parameter after the step.

Gradient norm: each rank sums the squares of its pieces, the sum is all-reduced over the DP group
(booked as 'grad_norm') and then over model-parallel ranks by the trainer's `grad_norm_sq_reduce`.
Sequence-parallel norm weights hold partial gradients per TP rank: the pieces of those are
all-reduced over TP here (every TP rank has the same layout, so the pieces line up).

Optimizer state is exposed layout-free (`sharded_state_dict`): per parameter name, `FlatShard`s
of its master, exp_avg and exp_avg_sq giving the parameter's shape and the flat offset of this
rank's piece, which is what a checkpoint needs to save and reshard it (`to_sharded_tensors` gives
torch.distributed.checkpoint ShardedTensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from parallel.collectives import Group, all_reduce
from parallel.tensor_parallel import PARTIAL_GRAD_ATTR
from parallel.zero import Segment

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class FlatShard:
    """A piece of one parameter-shaped tensor: flat elements [offset, offset + local.numel())."""

    global_shape: tuple
    """Shape of the whole tensor (the parameter on this model-parallel rank)."""
    offset: int
    """First element of the piece in the flattened tensor."""
    local: Tensor
    """The piece, 1-D."""


class ShardedOptimizer:
    """Clipping + AdamW over pieces; `step(lr, grad_norm_sq_reduce)` returns the global grad norm.

    pieces: (segment, param piece, grad piece) with the param piece a view of this rank's
    parameter storage and the grad piece its DP-reduced fp32 gradient.
    after_step: called after the update (stages 1-2 all-gather the parameters there).
    """

    def __init__(self, pieces: list[tuple[Segment, Tensor, Tensor]], cfg, group: Group,
                 counts_in_norm: Optional[Callable] = None, tp_group: Optional[Group] = None,
                 after_step: Optional[Callable[[], None]] = None, memory: Optional[Callable[[], dict]] = None):
        self.cfg, self.group, self.tp_group = cfg, group, tp_group
        self.after_step, self._memory = after_step, memory
        counts = counts_in_norm or (lambda name, p: True)
        self.segments = [s for s, _, _ in pieces]
        self.param_pieces = [p for _, p, _ in pieces]
        self.grad_pieces = [g for _, _, g in pieces]
        self.masters = [p if p.dtype == torch.float32 else p.detach().float() for p in self.param_pieces]
        self.norm_grads = [g for s, g in zip(self.segments, self.grad_pieces) if counts(s.name, s.param)]
        self.partial_grads = [g for s, g in zip(self.segments, self.grad_pieces)
                              if getattr(s.param, PARTIAL_GRAD_ATTR, False)]
        decay = [m for s, m in zip(self.segments, self.masters) if s.param.ndim >= 2]
        no_decay = [m for s, m in zip(self.segments, self.masters) if s.param.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        if not groups:  # a rank may own nothing (tiny model, large N_d): keep a no-op optimizer
            groups = [{"params": [torch.zeros(0)], "weight_decay": 0.0}]
        try:
            self.optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)

    def _finish_partial_grads(self) -> None:
        if self.tp_group is None or self.tp_group.size == 1 or not self.partial_grads:
            return
        flat = torch.cat(self.partial_grads)
        all_reduce(flat, self.tp_group, purpose="sequence_parallel_grads")
        torch._foreach_copy_(self.partial_grads, list(flat.split([g.numel() for g in self.partial_grads])))

    def step(self, lr: float, grad_norm_sq_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> float:
        """Clip, AdamW at `lr`, round masters into the parameters, then `after_step`; return the norm.

        Same rules as engine.train.optim.MasterWeightOptimizer: norm before clipping, scale by
        clip / (norm + 1e-6) when norm > clip, a non-finite norm skips the update (the
        parameters are still all-gathered, so every rank issues the same collectives).
        """
        self._finish_partial_grads()
        if self.norm_grads:
            norm_sq = torch.stack(torch._foreach_norm(self.norm_grads, 2.0)).square().sum()
        else:
            norm_sq = torch.zeros((), dtype=torch.float32, device=self.group.device)
        all_reduce(norm_sq, self.group, purpose="grad_norm")
        if grad_norm_sq_reduce is not None:
            norm_sq = grad_norm_sq_reduce(norm_sq)
        norm = math.sqrt(float(norm_sq))
        if math.isfinite(norm):
            self._update(lr, norm)
        if self.after_step is not None:
            self.after_step()
        return norm

    def _update(self, lr: float, norm: float) -> None:
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad and self.grad_pieces:
            torch._foreach_mul_(self.grad_pieces, self.cfg.clip_grad / (norm + 1e-6))
        for master, grad in zip(self.masters, self.grad_pieces):
            master.grad = grad
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            low = [(p, m) for p, m in zip(self.param_pieces, self.masters) if p is not m]
            if low:
                torch._foreach_copy_([p for p, _ in low], [m for _, m in low])
        for master in self.masters:
            master.grad = None  # the grad pieces are views of the reduced buffers: drop the alias

    # ------------------------------------------------------------------ state

    def sharded_state_dict(self) -> dict:
        """{param name: {'master', 'exp_avg', 'exp_avg_sq': FlatShard, 'step': float}} for this rank's pieces.

        The tensors are the live state (not copies). Before the first step Adam's moments do not
        exist yet and only the master is given. A parameter this rank owns no piece of is absent.
        """
        out = {}
        for segment, master in zip(self.segments, self.masters):
            shape = tuple(segment.param.shape)
            entry = {"master": FlatShard(shape, segment.param_offset, master)}
            state = self.optimizer.state.get(master, {})
            for key in ADAM_STATE_KEYS:
                if key in state:
                    entry[key] = FlatShard(shape, segment.param_offset, state[key])
            if "step" in state:
                entry["step"] = float(state["step"])
            out[segment.name] = entry
        return out

    def state_dict(self) -> dict:
        """A copy of `sharded_state_dict()` (restorable into the same layout with load_state_dict)."""
        def copy(value):
            return FlatShard(value.global_shape, value.offset, value.local.clone()) if isinstance(value, FlatShard) else value
        return {name: {k: copy(v) for k, v in entry.items()} for name, entry in self.sharded_state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore pieces saved from the same layout (reshard through a checkpoint otherwise)."""
        for segment, master, param in zip(self.segments, self.masters, self.param_pieces):
            entry = sd.get(segment.name)
            if entry is None or entry["master"].offset != segment.param_offset \
                    or entry["master"].local.numel() != segment.length:
                raise KeyError(f"optimizer state for {segment.name} [{segment.param_offset}, +{segment.length}) "
                               "is not in this state dict: it was saved from another ZeRO layout")
            master.copy_(entry["master"].local)
            if param is not master:
                param.copy_(master)
            if "step" in entry:
                state = self.optimizer.state[master]
                state["step"] = torch.tensor(entry["step"], dtype=torch.float32)
                for key in ADAM_STATE_KEYS:
                    state[key] = entry[key].local.clone()
        if self.after_step is not None:
            self.after_step()  # stages 1-2: every rank's parameters from the loaded masters

    def memory_bytes(self) -> dict:
        """Per-rank bytes: params and grads (from the sharded buffers) and optimizer state
        (Adam's exp_avg and exp_avg_sq, plus fp32 masters when the parameters are not fp32)."""
        optimizer = sum(m.numel() * 4 for p, m in zip(self.param_pieces, self.masters) if p is not m)
        for master in self.masters:
            for key in ADAM_STATE_KEYS:
                value = self.optimizer.state.get(master, {}).get(key)
                if value is not None:
                    optimizer += value.numel() * value.element_size()
        return {**(self._memory() if self._memory else {}), "optimizer": optimizer}


def to_sharded_tensors(sharded_state: dict, layout, group_ranks: list[int], my_index: int) -> dict:
    """{'<param>.<key>': 1-D ShardedTensor of the flattened parameter-shaped state} for DCP.

    Every DP rank's piece of every parameter comes from the layout (`layout.segments(r)`), so
    the global metadata is built without communication; `group_ranks` maps DP index to global
    rank. DCP saves each tensor with its global size and on load reads whatever saved pieces
    overlap the requested ones, so state written at one DP size loads at another.
    """
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    owners: dict[str, list] = {}
    for index in range(layout.dp_size):
        for segment in layout.segments(index):
            owners.setdefault(segment.name, []).append((index, segment.param_offset, segment.length))
    out = {}
    for name, entry in sharded_state.items():
        for key, value in entry.items():
            if not isinstance(value, FlatShard):
                continue
            metadata, local = [], []
            for index, offset, length in owners[name]:
                meta = ShardMetadata([offset], [length], f"rank:{group_ranks[index]}/{value.local.device}")
                metadata.append(meta)
                if index == my_index:
                    local.append(Shard(value.local, meta))
            props = TensorProperties(dtype=value.local.dtype)
            numel = math.prod(value.global_shape)
            out[f"{name}.{key}"] = ShardedTensor._init_from_local_shards_and_global_metadata(
                local, ShardedTensorMetadata(metadata, torch.Size([numel]), props))
    return out

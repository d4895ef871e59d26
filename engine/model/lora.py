"""LoRA (Hu et al. 2021): low-rank adapters on the decoder's linear layers, the base weights frozen.

A target layer computes y = x W^T + (alpha / r) (x A^T) B^T with A [r, in] and B [out, r]. B
starts at zero, so training starts from the base model exactly; A starts normal with std
1/sqrt(in). Only A and B train: the optimizer and the gradient buffers hold nothing else, and
the base weights stay bit for bit what `train.init_from` loaded.

Tensor parallelism keeps the layer's own communication: in a column-parallel layer (W's output
rows sharded) B is sharded with those rows and A is replicated; in a row-parallel layer (W's
input columns sharded) A is sharded with those columns and B is replicated, and the layer's
all-reduce (or reduce-scatter) of x W_r^T sums the adapter path too, since sum_r (x_r A_r^T) B^T
= (x A^T) B^T. The replicated factor's gradient is then a partial sum over TP ranks: it is marked
like sequence-parallel norms and summed after backward (parallel/tensor_parallel.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.sharding import TP_SHARD
from parallel.tensor_parallel import PARTIAL_GRAD_ATTR

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Names of the decoder linear layers that can carry adapters (all of them by default)."""


def lora_linear(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """x W^T + scale * (x A^T) B^T."""
    return F.linear(x, weight) + scale * F.linear(F.linear(x, a), b)


class LoRALinear(nn.Linear):
    """nn.Linear (no bias) plus adapters `lora_A`, `lora_B`; the same weight parameter."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        self.lora_B = nn.Parameter(torch.empty(linear.out_features, rank, device=linear.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale)


def _add_to_parallel_layer(module: nn.Module, rank: int, scale: float) -> None:
    """Adapters on a Column/RowParallelLinear, sharded as the module doc says; its GEMM gains the path."""
    out_local, in_local = module.weight.shape
    dim, tp_rank, tp = getattr(module.weight, TP_SHARD)
    device = module.weight.device
    module.lora_A = nn.Parameter(torch.empty(rank, in_local, device=device))
    module.lora_B = nn.Parameter(torch.empty(out_local, rank, device=device))
    sharded, replicated = (module.lora_B, module.lora_A) if dim == 0 else (module.lora_A, module.lora_B)
    setattr(sharded, TP_SHARD, (dim, tp_rank, tp))
    setattr(replicated, PARTIAL_GRAD_ATTR, True)
    module.linear_fn = lambda x, w: lora_linear(x, w, module.lora_A, module.lora_B, scale)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> list[str]:
    """Add rank-`rank` adapters to the decoder linear layers named in `targets` and freeze every
    other parameter; returns the adapted module names. Call after tensor parallelism, before init."""
    scale = alpha / rank
    adapted = []
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] not in targets or ".layers." not in f".{name}":
            continue
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(module, rank, scale))
        elif hasattr(module, "linear_fn") and hasattr(module.weight, TP_SHARD):
            _add_to_parallel_layer(module, rank, scale)
        else:  # MoE expert stacks: no adapters
            continue
        adapted.append(name)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return adapted


def is_adapter(name: str) -> bool:
    """True for a LoRA factor's parameter name."""
    return name.endswith(("lora_A", "lora_B"))


@torch.no_grad()
def merge_lora(state: dict, scale: float) -> dict:
    """A full state dict with adapters folded in: W + scale * B A for every adapted W, no lora keys."""
    merged = {k: v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if key.endswith("lora_A"):
            base = key[:-len("lora_A")] + "weight"
            a, b = state[key].float(), state[key[:-1] + "B"].float()
            merged[base] = (state[base].float() + scale * b @ a).to(state[base].dtype)
    return merged

"""The emulated fp8 linear layer, and which of a model's GEMMs run in fp8.

`fp8_linear(x, W, quantizers)` is `F.linear(x, W)` (no bias) through three fp8 GEMMs
(engine/model/fp8/recipes.py): forward y = x W^T from x and W quantised along their last
dimension; backward dx = dy W and dW = dy^T x from dy quantised both ways and the columnwise x
and W^T saved in fp8 at forward (a quarter of fp32's bytes), as Transformer Engine's Linear
saves them. The values are the fp8 GEMMs' (engine/model/fp8/quantize.py: fp8_gemm).

The decoder layers' linear layers (q/k/v/o, gate/up/down) run in fp8; embedding, norms, the
attention core, the head, the loss and MoE expert stacks stay in bf16, as with TE. The first and
last `precision.fp8_{first,last}_layers_bf16` decoder layers stay in bf16 too (Megatron's
--first-last-layers-bf16). A plain nn.Linear is replaced by Fp8Linear (same weight, same name);
a tensor-parallel layer keeps its class and its communication and gets the fp8 GEMM as its
`linear_fn`.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

import torch
from torch import Tensor, nn

from engine.model.fp8.quantize import Quantized, fp8_gemm
from engine.model.fp8.recipes import Fp8Recipe, LinearQuantizers

FP8_LINEARS = ("layers.*.self_attn.q_proj", "layers.*.self_attn.k_proj", "layers.*.self_attn.v_proj",
               "layers.*.self_attn.o_proj", "layers.*.mlp.gate_proj", "layers.*.mlp.up_proj",
               "layers.*.mlp.down_proj")
"""Module-name patterns of the GEMMs that run in fp8 (the decoder layers' linear layers)."""

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T, dx = dy W, dW = dy^T x, each GEMM on fp8 operands of the layer's recipe."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, quantizers: LinearQuantizers) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        qx, qx_t = quantizers.input.both(rows)
        qw, qw_t = quantizers.weight.both(weight)
        out = fp8_gemm(qx, qw, x.dtype)
        ctx.save_for_backward(qx_t.data, qx_t.scale_inv, qw_t.data, qw_t.scale_inv)
        ctx.layouts = (qx_t.block, qx_t.power_2, qw_t.block, qw_t.power_2)
        ctx.quantizers, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = quantizers, x.shape, x.dtype, weight.dtype
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        x_block, x_pow2, w_block, w_pow2 = ctx.layouts
        qx_t, qw_t = Quantized(x_data, x_scale, x_block, x_pow2), Quantized(w_data, w_scale, w_block, w_pow2)
        qg, qg_t = ctx.quantizers.grad_output.both(grad.reshape(-1, grad.shape[-1]))
        grad_x = fp8_gemm(qg, qw_t, ctx.x_dtype).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = fp8_gemm(qg_t, qx_t, ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def fp8_linear(x: Tensor, weight: Tensor, quantizers: LinearQuantizers) -> Tensor:
    """`F.linear(x, weight)` (no bias) through the emulated fp8 GEMMs of `quantizers`' recipe."""
    return _Fp8Linear.apply(x, weight, quantizers)


class Fp8GEMM:
    """A tensor-parallel layer's `linear_fn` (x, W) -> x W^T in fp8."""

    def __init__(self, quantizers: LinearQuantizers):
        self.quantizers = quantizers

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:
        return fp8_linear(x, weight, self.quantizers)


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose GEMMs run in fp8; same parameter names as the layer it replaces."""

    def __init__(self, linear: nn.Linear, quantizers: LinearQuantizers):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.quantizers = quantizers

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.quantizers)


def fp8_layer_names(model: nn.Module, num_layers: int, first_bf16: int = 0, last_bf16: int = 0,
                    patterns: Iterable[str] = FP8_LINEARS) -> list[str]:
    """Names of the modules whose GEMMs run in fp8: matching `patterns`, outside the bf16 first/last layers."""
    names = []
    for name, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            continue  # MoE expert stacks (engine.model.moe.ExpertWeights) keep their bf16 GEMMs
        match = _LAYER_INDEX.search(name)
        index = int(match.group(1)) if match else None
        if index is not None and (index < first_bf16 or index >= num_layers - last_bf16):
            continue
        if getattr(module, "bias", None) is not None:
            raise ValueError(f"fp8: {name} has a bias; the fp8 linear takes none")
        names.append(name)
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` in `model` (its parameters keep their names when it holds the same ones)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def convert_to_emulation(model: nn.Module, names: list[str], recipe: Fp8Recipe) -> None:
    """Route the GEMMs of the modules `names` through the recipe's emulated fp8 linear."""
    for name in names:
        module = model.get_submodule(name)
        quantizers = recipe.quantizers(name)
        if type(module) is nn.Linear:
            replace_module(model, name, Fp8Linear(module, quantizers))
        elif hasattr(module, "linear_fn"):  # parallel.tensor_parallel layers: communication unchanged
            module.linear_fn = Fp8GEMM(quantizers)
        else:
            raise TypeError(f"fp8: {name} is a {type(module).__name__}, neither nn.Linear nor a tensor-parallel linear")

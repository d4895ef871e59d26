"""fp8 training with Transformer Engine's delayed-scaling recipe, emulated in PyTorch.

The recipe (TE's `DelayedScaling`, format HYBRID): every GEMM of a decoder layer (q/k/v/o,
gate/up/down) reads its input and weight in E4M3 and, in backward, the output gradient in E5M2.
Each of those three tensors has its own scale: a tensor x enters fp8 as
saturate(x * scale) rounded to the format, and a GEMM of two fp8 operands a, b is
(a b) / (scale_a * scale_b), accumulated in fp32. Scales are *delayed*: those of step k come from
the amax (max |x|) history of steps before k. After every optimizer step `Fp8Recipe.update`
reduces this step's amaxes (max over the ranks that see other parts of the same tensors: TP and
data/context-parallel ranks, like TE's amax reduction group), pushes them into a history of
`amax_history_len` steps and sets scale = fp8_max / amax_ref / 2^margin, with amax_ref the
history's max (`amax_compute_algo="max"`) or the latest (`"most_recent"`). A zero or non-finite
amax keeps the previous scale. Scales start at 1. Embedding, norms, attention core, the head
and the loss stay in bf16, as with TE.

On CPU the quantisation is exact (torch's float8 dtypes) and the GEMMs run on the fp8 values
held in bf16 (every E4M3/E5M2 value is a bf16 value) with fp32 accumulation, then descale: the
same numbers an fp8 GEMM produces up to the output's rounding. That is the path tested here. On
a GPU the same emulation runs (correct, not fast); swapping in Transformer Engine's fp8 kernels
needs a GPU machine to test against this emulation and is not done.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
"""Largest finite value of each fp8 format."""

FP8_LINEARS = ("layers.*.self_attn.q_proj", "layers.*.self_attn.k_proj", "layers.*.self_attn.v_proj",
               "layers.*.self_attn.o_proj", "layers.*.mlp.gate_proj", "layers.*.mlp.up_proj",
               "layers.*.mlp.down_proj")
"""Module-name patterns of the GEMMs that run in fp8 (the decoder layers' linear layers)."""


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """saturate(x * scale) rounded to the fp8 `dtype` (round-to-nearest-even, as TE's cast)."""
    limit = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


def fp8_matmul(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """(a @ b) / (scale_a * scale_b) for fp8 a [.., m, k], b [k, n]: bf16 GEMM of the exact fp8 values."""
    product = torch.matmul(a.to(torch.bfloat16), b.to(torch.bfloat16))
    return (product.float() / (scale_a * scale_b)).to(out_dtype)


@dataclass
class Fp8TensorMeta:
    """Scale and amax history of one fp8 tensor role (a GEMM's input, weight or output gradient)."""

    dtype: torch.dtype
    scale: Tensor = field(default_factory=lambda: torch.ones(()))
    amax: Tensor = field(default_factory=lambda: torch.zeros(()))  # max |x| seen this step
    history: list = field(default_factory=list)  # amaxes of past steps, newest last

    def observe(self, x: Tensor) -> None:
        """Fold max |x| into this step's amax (several microbatches per step take the max)."""
        self.amax = torch.maximum(self.amax, x.detach().abs().max().float().cpu())


@dataclass
class Fp8LinearMeta:
    """The three fp8 tensor roles of one linear layer."""

    input: Fp8TensorMeta = field(default_factory=lambda: Fp8TensorMeta(E4M3))
    weight: Fp8TensorMeta = field(default_factory=lambda: Fp8TensorMeta(E4M3))
    grad_output: Fp8TensorMeta = field(default_factory=lambda: Fp8TensorMeta(E5M2))

    def roles(self) -> tuple[Fp8TensorMeta, Fp8TensorMeta, Fp8TensorMeta]:
        """(input, weight, grad_output)."""
        return self.input, self.weight, self.grad_output


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with x, W in E4M3; dx = g W and dW = g^T x with g in E5M2 (all at the meta's scales)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, meta: Fp8LinearMeta) -> Tensor:
        meta.input.observe(x)
        meta.weight.observe(weight)
        scale_x, scale_w = meta.input.scale.to(x.device), meta.weight.scale.to(x.device)
        qx, qw = quantize(x, scale_x, E4M3), quantize(weight, scale_w, E4M3)
        # The fp8 copies are what backward needs: a quarter of fp32, half of bf16.
        ctx.save_for_backward(qx, qw, scale_x, scale_w)
        ctx.meta, ctx.x_dtype, ctx.w_dtype = meta, x.dtype, weight.dtype
        return fp8_matmul(qx, scale_x, qw.t(), scale_w, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        qx, qw, scale_x, scale_w = ctx.saved_tensors
        meta = ctx.meta
        meta.grad_output.observe(grad)
        scale_g = meta.grad_output.scale.to(grad.device)
        qg = quantize(grad, scale_g, E5M2)
        grad_x = fp8_matmul(qg, scale_g, qw, scale_w, ctx.x_dtype)
        grad_w = fp8_matmul(qg.flatten(0, -2).t(), scale_g, qx.flatten(0, -2), scale_x, ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: Tensor, weight: Tensor, meta: Fp8LinearMeta) -> Tensor:
    """`F.linear(x, weight)` (no bias) through the emulated fp8 GEMMs, recording amaxes into `meta`."""
    return _Fp8Linear.apply(x, weight, meta)


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose GEMMs run in fp8; same parameter names as the layer it replaces."""

    def __init__(self, linear: nn.Linear, meta: Fp8LinearMeta):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.fp8_meta = meta

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.fp8_meta)


@dataclass
class Fp8Recipe:
    """TE's DelayedScaling knobs (defaults as TE's) and the metas of the layers it converted."""

    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    metas: dict = field(default_factory=dict)  # module name -> Fp8LinearMeta

    def convert(self, model: nn.Module, patterns=FP8_LINEARS) -> list[str]:
        """Route the GEMMs of the modules matching `patterns` through fp8; return their names.

        A plain nn.Linear is replaced by Fp8Linear (same weight); a tensor-parallel layer keeps
        its class and gets `linear_fn` = fp8_linear, so its communication is unchanged.
        """
        converted = []
        for name, module in list(model.named_modules()):
            if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            if getattr(module, "bias", None) is not None:
                raise ValueError(f"fp8: {name} has a bias; the emulated fp8 linear takes none")
            meta = self.metas.setdefault(name, Fp8LinearMeta())
            if type(module) is nn.Linear:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, Fp8Linear(module, meta))
            elif hasattr(module, "linear_fn"):
                module.linear_fn = lambda x, w, meta=meta: fp8_linear(x, w, meta)
            else:  # MoE expert stacks (engine.model.moe.ExpertWeights) keep their bf16 GEMMs
                del self.metas[name]
                continue
            converted.append(name)
        return converted

    def update(self, amax_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        """End of a step: reduce this step's amaxes (max over ranks), push them into the history,
        set the next step's scales, and restart the amaxes from zero."""
        roles = [role for meta in self.metas.values() for role in meta.roles()]
        if not roles:
            return
        amaxes = torch.stack([role.amax for role in roles])
        if amax_reduce is not None:
            amaxes = amax_reduce(amaxes)
        for role, amax in zip(roles, amaxes):
            role.history = (role.history + [amax.clone()])[-self.amax_history_len:]
            ref = role.history[-1] if self.amax_compute_algo == "most_recent" else torch.stack(role.history).max()
            new = FP8_MAX[role.dtype] / ref / 2.0 ** self.margin
            # TE keeps the previous scale where the amax is zero or not finite.
            role.scale = torch.where((ref > 0) & torch.isfinite(ref), new, role.scale)
            role.amax = torch.zeros(())

    def state_dict(self) -> dict:
        """Scales and amax histories by layer name, as plain floats (exact for fp32 values): a
        checkpoint needs them for a bitwise resume."""
        return {name: [{"scale": float(r.scale), "history": [float(h) for h in r.history]} for r in meta.roles()]
                for name, meta in self.metas.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s scales and histories (layers not in it keep theirs)."""
        for name, roles in state.items():
            if name in self.metas:
                for role, saved in zip(self.metas[name].roles(), roles):
                    role.scale = torch.tensor(saved["scale"], dtype=torch.float32)
                    role.history = [torch.tensor(h, dtype=torch.float32) for h in saved["history"]]

"""Opt-in torch.compile of the decoder: each layer compiled on its own (torchtitan's per-block compile).

Compiling block by block keeps graphs small (one graph serves every layer, since parameters are
graph inputs), leaves the layer loop, recompute and pipeline slicing in eager Python, and keeps
parameter names unchanged (`nn.Module.compile` compiles in place, no `_orig_mod.` prefix), so
checkpoints and the optimizer see the same model. What it buys on CPU is fusion of the
memory-bound element-wise work around the matmuls (RMSNorm, RoPE, SwiGLU, residual adds and
their backward), which otherwise dominates a bf16 step.
"""
from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile every decoder layer of `model` in place (dynamic=False: shapes are fixed in training)."""
    for layer in model.layers.values():
        layer.compile(mode=mode, dynamic=False)
    return model

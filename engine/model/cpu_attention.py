"""Causal attention for bf16 training on CPU: ATen's flash forward, a block-causal backward.

ATen's CPU flash-attention backward does the full s x s work whatever the mask and runs its
GEMMs in small tiles: at the benchmark's shapes (seq 512, head dim 64) it is ~6x slower than its
forward and took a quarter of a 150M-parameter step. The backward here walks key blocks of
`BLOCK` columns and, for each, only the query rows at or below it (the causal triangle: 10/16 of
the full work at 4 blocks), as batched bf16 matmuls over every (batch, head); the element-wise
work between them (P = exp(S * scale - lse), the mask, dS = P * (dP - D)) is fused by inductor.

It is used only where it wins and is exact enough: bf16/fp16 inputs on CPU, inside a
torch.compile'd region (eagerly, the element-wise steps are separate memory-bound passes and the
ATen backward is faster), sequence length a multiple of BLOCK up to MAX_SEQ. Everything else takes
`F.scaled_dot_product_attention`. Scores and dP leave the bf16 GEMM rounded to bf16 (ATen's
kernel keeps them in fp32); the gradients' error against an fp64 reference stays within 2x of
ATen's own bf16 backward (tests/test_cpu_attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 128
"""Key-block width of the backward: 128 measured fastest at seq 512 (64 and 256 were slower)."""

MAX_SEQ = 512
"""Longest sequence the block backward takes. Measured on this machine (2 cores, AMX, head dim
64, 4096 tokens): ATen's backward -> block backward, ms per layer: seq 256 71 -> 47, 512 93 -> 55,
768 75 -> 100, 2048 122 -> 165. Its element-wise traffic grows with s^2 / 2 through memory, where
ATen's tiles stay in cache, so past 512 the GEMM work it saves no longer pays."""


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """[b, hkv, s, d] -> [b, hkv * groups, s, d], query head i reading kv head i // groups (SDPA's GQA)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def block_causal_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                          scale: float, block: int = BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of causal softmax attention from the forward's output and log-sum-exp.

    q, k, v, out, grad_out: [b, h, s, d] (k, v already expanded to h heads); lse: [b, h, s] fp32.
    For key block j, P = exp(q[j:] k_j^T * scale - lse[j:]) over the query rows that see it,
    dV_j = P^T dO[j:], dS = P * (dO[j:] v_j^T - D) with D = rowsum(dO * out), dK_j = dS^T q[j:]
    * scale, and dq[j:] += dS k_j * scale (accumulated in fp32).
    """
    s = q.shape[2]
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for j in range(0, s, block):
        q_rows, do_rows = q[:, :, j:], grad_out[:, :, j:]
        k_blk, v_blk = k[:, :, j:j + block], v[:, :, j:j + block]
        scores = torch.matmul(q_rows, k_blk.transpose(-1, -2)).float()
        probs = torch.exp(scores * scale - lse[:, :, j:, None])
        # Row r of this slice is query j + r, column c is key j + c: keys after the query are masked.
        rows = torch.arange(s - j, device=q.device)[:, None]
        probs = torch.where(rows >= torch.arange(block, device=q.device), probs, 0.0)
        dv[:, :, j:j + block] = torch.matmul(probs.to(q.dtype).transpose(-1, -2), do_rows)
        dprobs = torch.matmul(do_rows, v_blk.transpose(-1, -2)).float()
        dscores = (probs * (dprobs - delta[:, :, j:])).to(q.dtype)
        dk[:, :, j:j + block] = torch.matmul(dscores.transpose(-1, -2), q_rows) * scale
        dq[:, :, j:] += torch.matmul(dscores, k_blk).float()
    return (dq * scale).to(q.dtype), dk, dv


class _BlockCausalAttention(torch.autograd.Function):
    """ATen flash forward (which also returns the log-sum-exp), `block_causal_backward` backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        groups = q.shape[1] // k.shape[1]
        k_full, v_full = _expand_kv(k, groups), _expand_kv(v, groups)
        scale = q.shape[-1] ** -0.5
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_full, v_full, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k_full, v_full, out, lse)
        ctx.groups, ctx.scale = groups, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k_full, v_full, out, lse = ctx.saved_tensors
        dq, dk, dv = block_causal_backward(q, k_full, v_full, out, lse, grad_out, ctx.scale)
        if ctx.groups > 1:
            b, h, s, d = dk.shape
            dk = dk.view(b, h // ctx.groups, ctx.groups, s, d).sum(2)
            dv = dv.view(b, h // ctx.groups, ctx.groups, s, d).sum(2)
        return dq, dk, dv


def block_causal_applies(q: Tensor, k: Tensor) -> bool:
    """True where the block-causal backward is the faster exact-enough choice (see the module doc)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad
            and torch.is_grad_enabled() and torch.compiler.is_compiling()
            and q.shape[2] % BLOCK == 0 and q.shape[2] <= MAX_SEQ and q.shape[2] == k.shape[2])


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention core: q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d] (GQA native)."""
    if block_causal_applies(q, k):
        return _BlockCausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

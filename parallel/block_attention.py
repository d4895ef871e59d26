"""Softmax attention of one query block over one key block, with its log-sum-exp: what ring attention merges.

    out, lse = block_forward(q, k, v, scale, causal)         # merged over blocks with merge_into
    dq, dk, dv = block_backward(grad_out, q, k, v, out, lse, scale, causal)

q [b, hq, sq, d], k/v [b, hkv, sk, d] in the model's dtype (hq a multiple of hkv: grouped-query
attention, query head i reading K/V head i // (hq/hkv)); `causal` needs sq == sk and lets query i
see keys 0..i. `lse` [b, hq, sq] is in fp32 (fp64 for fp64 inputs).

The backward is FlashAttention-2's, and it is exact per block when handed the *final* output and
LSE of the whole attention: with P = exp(S * scale - lse) and D = rowsum(dO * O), a block's
dq, dk, dv are its share of the full gradients, so ring attention sums the blocks' results.

Kernels: on CPU ATen's fused flash attention (`_scaled_dot_product_flash_attention_for_cpu` and
its backward): tiled, in the model's dtype with fp32 softmax statistics, no score matrix in
memory. Elsewhere the same math with matmuls in fp32 (`fused=False`, also what tests compare the
kernel with). On CUDA the fused alternative is Transformer Engine's
`DotProductAttention(cp_group=..., cp_comm_type="p2p")`, which runs this zigzag ring with its own
flash kernels; engine/model/parallelize.py is where it would replace `RingAttention` when
transformer_engine imports (not built: no GPU here to test it on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class BlockMask:
    """Which keys of a block each query sees, beyond `causal`: document masking inside a ring block.

    `bias` [b, 1, sq, sk] is 0 where a query sees a key and -inf where it does not, in the
    attention's dtype (ATen's CPU flash kernel takes an additive mask of q's dtype); `empty`
    [b, 1, sq] marks query rows that see no key of the block: their LSE is -inf, so merging the
    block leaves them untouched (the kernel itself reports 0 there).
    """

    bias: Tensor
    empty: Tensor

    @classmethod
    def from_visible(cls, visible: Tensor, dtype: torch.dtype) -> "BlockMask":
        """From a bool [b, sq, sk] (True: the query sees the key)."""
        bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        return cls(bias.unsqueeze(1), ~visible.any(-1).unsqueeze(1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64: where LSEs and accumulators live."""
    return torch.promote_types(dtype, torch.float32)


def _expand_heads(x: Tensor, groups: int) -> Tensor:
    """[b, hkv, s, d] -> [b, hkv * groups, s, d], one copy of each K/V head per query head it serves."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold_heads(grad: Tensor, groups: int) -> Tensor:
    """Inverse of `_expand_heads` for gradients: sum each K/V head's copies (in the compute dtype)."""
    return grad if groups == 1 else grad.unflatten(1, (-1, groups)).sum(2, dtype=compute_dtype(grad.dtype))


def _use_fused(q: Tensor, fused: Optional[bool]) -> bool:
    if fused is None:
        return q.device.type == "cpu"
    if fused and q.device.type != "cpu":
        raise ValueError(f"the fused block kernel is ATen's CPU flash attention; q is on {q.device}")
    return fused


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, mask: Optional[BlockMask] = None) -> Tensor:
    """Scaled scores [b, hq, sq, sk] in the compute dtype, future (and masked) keys at -inf under `causal`."""
    c = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(c), k.to(c).transpose(-1, -2)).mul_(scale)
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(future, float("-inf"))
    if mask is not None:
        scores.add_(mask.bias.to(c))
    return scores


def block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                  fused: Optional[bool] = None, mask: Optional[BlockMask] = None) -> tuple[Tensor, Tensor]:
    """(softmax(q k^T * scale) v, logsumexp of the scores) of one block.

    Without `mask` every query row sees >= 1 key; with it, a row that sees none gets output 0 and
    LSE -inf (it adds nothing when merged). The output is in q's dtype from the fused kernel and
    in the compute dtype from the math.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, groups), _expand_heads(v, groups)
    if _use_fused(q, fused):
        bias = None if mask is None else mask.bias
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
    else:
        scores = _scores(q, k, scale, causal, mask)
        lse = torch.logsumexp(scores, dim=-1)
        # A row without keys has lse -inf: subtract 0 there so its probabilities are exp(-inf) = 0.
        out = torch.matmul(scores.sub_(lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1)).exp_(),
                           v.to(scores.dtype))
    if mask is not None:
        lse = lse.masked_fill(mask.empty, float("-inf"))
        out = out.masked_fill(mask.empty.unsqueeze(-1), 0.0)
    return out, lse


def merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Online softmax: fold a block's normalised output and LSE into the running (out, lse) in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_((lse - new_lse).exp_().unsqueeze(-1)).add_(block_out * (block_lse - new_lse).exp_().unsqueeze(-1))
    lse.copy_(new_lse)


def block_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   causal: bool, fused: Optional[bool] = None,
                   mask: Optional[BlockMask] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block, given the whole attention's final `out` (q's dtype) and `lse`.

    dk/dv have k's head count (GQA copies summed); the fused kernel returns q's dtype, the math
    the compute dtype. The final `lse` is finite on every row (each query sees itself), so masked
    keys get probability exp(-inf - lse) = 0 and add nothing.
    """
    groups = q.shape[1] // k.shape[1]
    k_heads, v_heads = _expand_heads(k, groups), _expand_heads(v, groups)
    if _use_fused(q, fused):
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k_heads, v_heads, out.contiguous(), lse.contiguous(), 0.0, causal,
            attn_mask=None if mask is None else mask.bias, scale=scale)
    else:
        c = compute_dtype(q.dtype)
        probs = _scores(q, k_heads, scale, causal, mask).sub_(lse.to(c).unsqueeze(-1)).exp_()
        grad_out_c = grad_out.to(c)
        delta = (grad_out_c * out.to(c)).sum(-1, keepdim=True)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out_c)
        grad_scores = torch.matmul(grad_out_c, v_heads.to(c).transpose(-1, -2)).sub_(delta).mul_(probs)
        grad_q = torch.matmul(grad_scores, k_heads.to(c)).mul_(scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.to(c)).mul_(scale)
    return grad_q, _fold_heads(grad_k, groups), _fold_heads(grad_v, groups)

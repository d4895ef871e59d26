"""parallel/block_attention.py: one block of attention with its log-sum-exp, fused and by the matmul math.

In fp64 the fused CPU kernel (ATen's flash attention) and the math fallback (used off CPU) agree
to rounding with each other and with SDPA, causal and unmasked, GQA and MHA; two key blocks
merged by their LSE equal attention over both, and each block's backward fed the merged output
and LSE gives gradients whose sum over the blocks is the whole attention's.
"""
import pytest
import torch
import torch.nn.functional as F

from parallel.block_attention import block_backward, block_forward, merge_into

SCALE = 0.3


def _tensors(hq, hkv, sq, sk, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, sq, 8, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, hkv, sk, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_and_math_blocks_equal_sdpa_forward_and_backward(hq, hkv, causal):
    sk = 6 if causal else 10
    q, k, v = _tensors(hq, hkv, 6, sk)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=SCALE, enable_gqa=hq != hkv)
    grad = torch.randn_like(reference)
    reference.backward(grad)
    for fused in (True, False):
        out, lse = block_forward(q, k, v, SCALE, causal, fused=fused)
        assert (out - reference).abs().max() < 1e-13, fused
        assert lse.shape == (2, hq, 6) and lse.dtype == torch.float64
        grads = block_backward(grad, q, k, v, out.to(q.dtype), lse, SCALE, causal, fused=fused)
        for mine, leaf in zip(grads, leaves):
            assert mine.shape == leaf.shape
            assert (mine - leaf.grad).abs().max() < 1e-13, fused


@pytest.mark.parametrize("fused", [True, False])
def test_blocks_merged_by_lse_equal_attention_over_all_keys_and_their_grads_sum(fused):
    q, k, v = _tensors(4, 2, 5, 12, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*leaves, scale=SCALE, enable_gqa=True)
    grad = torch.randn_like(reference)
    reference.backward(grad)
    parts = [slice(0, 7), slice(7, 12)]
    out, lse = block_forward(q, k[:, :, parts[0]], v[:, :, parts[0]], SCALE, False, fused=fused)
    out, lse = out.clone(), lse.clone()
    merge_into(out, lse, *block_forward(q, k[:, :, parts[1]], v[:, :, parts[1]], SCALE, False, fused=fused))
    assert (out - reference).abs().max() < 1e-13
    grad_q = torch.zeros_like(q)
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
    for keys in parts:
        dq, dk, dv = block_backward(grad, q, k[:, :, keys], v[:, :, keys], out, lse, SCALE, False, fused=fused)
        grad_q += dq
        grad_k[:, :, keys] = dk
        grad_v[:, :, keys] = dv
    for mine, leaf in zip((grad_q, grad_k, grad_v), leaves):
        assert (mine - leaf.grad).abs().max() < 1e-13


def test_fused_block_keeps_the_models_dtype_and_fp32_statistics():
    q, k, v = _tensors(4, 2, 8, 8, dtype=torch.bfloat16)
    out, lse = block_forward(q, k, v, SCALE, True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = block_backward(torch.ones_like(out), q, k, v, out, lse, SCALE, True)
    assert grads[0].dtype == torch.bfloat16
    assert grads[1].dtype == torch.float32  # GQA copies summed in fp32

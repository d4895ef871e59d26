"""The block-causal attention backward (engine/model/cpu_attention.py) against SDPA and an fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

import engine.model.cpu_attention as cpu_attention
from engine.model.cpu_attention import BLOCK, MAX_SEQ, _BlockCausalAttention, block_causal_applies, causal_attention


def _inputs(b, hq, hkv, s, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    return q, k, v, grad_out


def _grads(fn, q, k, v, grad_out, dtype):
    leaves = [x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return out.detach(), [x.grad for x in leaves]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("hq,hkv,s", [(4, 4, 2 * BLOCK), (4, 2, 3 * BLOCK), (6, 1, BLOCK)])
def test_fp32_gradients_equal_sdpa(hq, hkv, s):
    """In fp32 the block walk is the same math as SDPA's backward: masks, log-sum-exp, GQA sums."""
    q, k, v, g = _inputs(2, hq, hkv, s, 16, torch.float32)
    out_ref, ref = _grads(_sdpa, q, k, v, g, torch.float32)
    out, mine = _grads(_BlockCausalAttention.apply, q, k, v, g, torch.float32)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_bf16_error_within_twice_aten(hq, hkv):
    """bf16: the gradients' error against fp64 is at most twice that of ATen's own bf16 backward."""
    q, k, v, g = _inputs(2, hq, hkv, 4 * BLOCK, 64, torch.bfloat16, seed=1)
    _, exact = _grads(_sdpa, q, k, v, g, torch.float64)
    _, aten = _grads(_sdpa, q, k, v, g, torch.bfloat16)
    _, mine = _grads(_BlockCausalAttention.apply, q, k, v, g, torch.bfloat16)
    for name, a, b, ref in zip("qkv", mine, aten, exact):
        assert a.dtype == torch.bfloat16
        assert _rel(a, ref) <= 2 * _rel(b, ref) + 1e-4, (name, _rel(a, ref), _rel(b, ref))


def test_compiled_bf16_region_takes_the_block_path(monkeypatch):
    """Inside torch.compile with bf16 inputs the core uses the block backward; eagerly it is SDPA."""
    calls = []
    original = cpu_attention.block_causal_backward
    monkeypatch.setattr(cpu_attention, "block_causal_backward",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v, g = _inputs(1, 4, 2, 2 * BLOCK, 32, torch.bfloat16, seed=2)
    _, exact = _grads(_sdpa, q, k, v, g, torch.float64)
    _, eager = _grads(causal_attention, q, k, v, g, torch.bfloat16)
    assert not calls
    torch._dynamo.reset()
    _, compiled = _grads(torch.compile(causal_attention, dynamic=False), q, k, v, g, torch.bfloat16)
    assert calls, "the compiled bf16 region did not take the block-causal backward"
    for a, b, ref in zip(compiled, eager, exact):
        assert _rel(a, ref) <= 2 * _rel(b, ref) + 1e-4


def test_applies_only_where_it_wins():
    """fp32, eager, a sequence that is not a multiple of the block or longer than MAX_SEQ keep SDPA."""
    bf = torch.zeros(1, 2, BLOCK, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not block_causal_applies(bf, bf)  # eager: not compiling
    assert not torch.compiler.is_compiling()
    fp32 = torch.zeros(1, 2, BLOCK, 8, requires_grad=True)
    odd = torch.zeros(1, 2, BLOCK + 1, 8, dtype=torch.bfloat16, requires_grad=True)
    long = torch.zeros(1, 2, MAX_SEQ + BLOCK, 8, dtype=torch.bfloat16, requires_grad=True)
    seen = []

    def probe(x):
        seen.append(block_causal_applies(x, x))
        return x * 2

    for x in (bf, fp32, odd, long):
        torch._dynamo.reset()
        torch.compile(probe, dynamic=False)(x)
    assert seen == [True, False, False, False]

"""Compute time in the performance model: GEMMs, the attention core, the memory-bound element-wise
work and the loss, per layer (or head) per microbatch on one GPU, forward and backward apart (so
recomputation can replay the forward).

- GEMMs: each of the layer's matmuls as the engine issues them (separate q/k/v projections; MoE
  experts one after another) at the roofline of the GPU: max(FLOPs / (peak x efficiency),
  bytes / HBM bandwidth); backward runs two of each (input and weight gradients).
- attention core, cp = 1: the flash kernel (SDPA) at its own efficiency, causal blocks skipped;
  without flash (2021 Megatron) batched GEMMs over the whole score matrix plus 32 bytes of fused
  softmax/dropout traffic per score element (forward 13, backward 19).
- attention core, cp > 1, as parallel/block_attention.py runs it on a GPU ('matmul'): every ring
  block as fp32 matmuls on CUDA cores (torch does not use TF32 by default), scores materialised in
  fp32, the causal diagonal block computed in full: per query-key pair and head 4d FLOPs and ~20
  bytes forward, 10d FLOPs and ~44 bytes backward (scores again, dV, dP, dQ, dK; exp, subtracts,
  products). Rank r computes a 2n x 2n diagonal block and cp-1 blocks of 2n^2 pairs (n = s/2cp).
  'flash' prices fused blocks like the cp = 1 kernel.
- element-wise: bytes per token each op reads and writes, eager (the engine) or fused, at the
  HBM's achievable bandwidth (counts in _ELEMENTWISE).
- loss: the logits GEMM, and at tp = 1 the engine's blockwise bf16 cross-entropy (blocks of
  cross_entropy_block_elements / vocab rows on a GPU, ~8 eager kernels each: at vocab 128256 that
  is 1046 rows and 8 blocks per 8k-token microbatch), at tp > 1 the vocab-parallel fp32 passes.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.perf.hardware import GPUSpec
from engine.perf.inputs import Assumptions
from engine.perf.memory import ActivationShape

# Element-wise bytes per element, (forward, backward), eager / fused. RMSNorm per residual-stream
# value: eager fp32 cast, pow, mean, rsqrt, two multiplies, cast back (40 bytes) and their
# backwards (72); fused one read and write each way. RoPE per q/k value: multiply, rotate_half
# (negate, cat), multiply, add. SwiGLU per ffn value: silu, multiply. Residual add per residual value.
_ELEMENTWISE = {
    "norm": {"eager": (40, 72), "fused": (4, 7)},
    "rope": {"eager": (20, 16), "fused": (4, 4)},
    "swiglu": {"eager": (10, 16), "fused": (6, 10)},
    "residual": {"eager": (6, 6), "fused": (6, 6)},
}


@dataclass(frozen=True)
class Pass:
    """Seconds of one piece of work, forward and backward."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        """Forward plus backward."""
        return self.forward + self.backward

    def __add__(self, other: "Pass") -> "Pass":
        return Pass(self.forward + other.forward, self.backward + other.backward)


def gemm_seconds(m: float, k: float, n: float, gpu: GPUSpec, efficiency: float, dtype_bytes: int = 2) -> float:
    """One [m, k] x [k, n] GEMM at the roofline: compute at peak x efficiency or HBM traffic."""
    if m <= 0 or k <= 0 or n <= 0:
        return 0.0
    flops = 2.0 * m * k * n
    traffic = dtype_bytes * (m * k + k * n + m * n)
    return max(flops / (gpu.peak_flops * efficiency), traffic / (gpu.hbm_bandwidth * gpu.hbm_efficiency))


def _gemm_pass(shapes: list, gpu: GPUSpec, efficiency: float) -> Pass:
    forward = sum(count * gemm_seconds(m, k, n, gpu, efficiency) for m, k, n, count in shapes)
    return Pass(forward, 2 * forward)


def layer_gemms(x: ActivationShape, ep: int = 1) -> list:
    """(m, k, n, count) of one layer's GEMMs per microbatch on one GPU, forward."""
    t, tokens = x.tp, x.tokens
    q, kv = x.heads * x.head_dim, x.kv_heads * x.head_dim
    shapes = [(tokens, x.h, q / t, 1), (tokens, x.h, kv / t, 2), (tokens, q / t, x.h, 1)]
    if x.experts:  # E/ep local experts, each over its share of this rank's tokens * topk copies
        rows = tokens * x.topk / (x.experts / ep)
        shapes += [(rows, x.h, x.expert_ffn, 2 * x.experts // ep), (rows, x.expert_ffn, x.h, x.experts // ep)]
    else:
        shapes += [(tokens, x.h, x.ffn / t, 2), (tokens, x.ffn / t, x.h, 1)]
    return shapes


def _efficiencies(gpu: GPUSpec, assume: Assumptions) -> tuple[float, float]:
    matmul = assume.matmul_efficiency if assume.matmul_efficiency is not None else gpu.matmul_efficiency
    attention = assume.attention_efficiency if assume.attention_efficiency is not None else gpu.attention_efficiency
    return matmul, attention


def attention_core(x: ActivationShape, cp: int, gpu: GPUSpec, assume: Assumptions) -> Pass:
    """The attention core of one layer per microbatch (see the module docstring)."""
    matmul, flash = _efficiencies(gpu, assume)
    heads = x.heads / x.tp
    q_width = heads * x.head_dim
    full_seq = x.s * cp
    # Causal attention's useful FLOPs (Megatron's counter: QK^T and AV at half cost), forward.
    useful = 2 * 2 * x.tokens * full_seq * q_width / 2
    if cp > 1 and assume.cp_attention == "matmul":
        n = x.s / 2
        pairs = (4 * n * n + (cp - 1) * 2 * n * n) * heads * x.b
        rate, bandwidth = gpu.fp32_flops * gpu.fp32_efficiency, gpu.hbm_bandwidth * gpu.hbm_efficiency
        return Pass(max(4 * x.head_dim * pairs / rate, 20 * pairs / bandwidth),
                    max(10 * x.head_dim * pairs / rate, 44 * pairs / bandwidth))
    if assume.flash_attention or cp > 1:
        forward = useful / (gpu.peak_flops * flash)
        return Pass(forward, 2 * forward)
    scores = heads * x.b * x.s * x.s  # the whole matrix, mask and all
    bandwidth = gpu.hbm_bandwidth * gpu.hbm_efficiency
    forward = 2 * useful / (gpu.peak_flops * matmul) + 13 * x.dtype_bytes / 2 * scores / bandwidth
    backward = 4 * useful / (gpu.peak_flops * matmul) + 19 * x.dtype_bytes / 2 * scores / bandwidth
    return Pass(forward, backward)


def elementwise(x: ActivationShape, gpu: GPUSpec, assume: Assumptions) -> Pass:
    """Memory-bound work of one layer per microbatch: two norms, RoPE on q and k, the SwiGLU (or the
    MoE's routing, gathers and weighting) and two residual adds (bf16 counts, see _ELEMENTWISE)."""
    kind = "fused" if assume.fused_elementwise else "eager"
    q, kv = x.heads * x.head_dim, x.kv_heads * x.head_dim
    residual = x.residual_tokens * x.h
    counts = {"norm": 2 * residual, "rope": x.tokens * (q + kv) / x.tp, "residual": 2 * residual}
    forward = backward = 0.0
    if x.experts:  # fp32 router input and softmax, the gather of copies, weighting and index_add
        copies = x.tokens * x.topk
        counts["swiglu"] = copies * x.expert_ffn
        forward += 6 * x.tokens * x.h + 14 * copies * x.h
        backward += 2 * (6 * x.tokens * x.h + 14 * copies * x.h)
    else:
        counts["swiglu"] = x.tokens * x.ffn / x.tp
    for op, elements in counts.items():
        fwd, bwd = _ELEMENTWISE[op][kind]
        forward += fwd * elements
        backward += bwd * elements
    bandwidth = gpu.hbm_bandwidth * gpu.hbm_efficiency
    return Pass(forward / bandwidth, backward / bandwidth)


def layer_compute(x: ActivationShape, cp: int, ep: int, gpu: GPUSpec, assume: Assumptions) -> dict:
    """{'gemm', 'attention', 'elementwise'}: Passes of one layer per microbatch on one GPU."""
    matmul, _ = _efficiencies(gpu, assume)
    gemm = _gemm_pass(layer_gemms(x, ep), gpu, matmul)
    if x.experts:  # the fp32 router GEMM on CUDA cores
        router = 2 * x.tokens * x.h * x.experts / (gpu.fp32_flops * gpu.fp32_efficiency)
        gemm = gemm + Pass(router, 2 * router)
    return {"gemm": gemm, "attention": attention_core(x, cp, gpu, assume), "elementwise": elementwise(x, gpu, assume)}


def head_compute(x: ActivationShape, gpu: GPUSpec, assume: Assumptions) -> Pass:
    """The output layer and loss of one microbatch on the last stage: the final norm, the logits
    GEMM, and the cross-entropy as the engine computes it (see the module docstring)."""
    matmul, _ = _efficiencies(gpu, assume)
    logits = _gemm_pass([(x.tokens, x.h, x.vocab / x.tp, 1)], gpu, matmul)
    bandwidth = gpu.hbm_bandwidth * gpu.hbm_efficiency
    norm = _ELEMENTWISE["norm"]["fused" if assume.fused_elementwise else "eager"]
    elements = x.tokens * x.vocab / x.tp
    if x.tp > 1:  # vocab-parallel fp32: cast, max, subtract, exp, sum, divide; clone, scatter, scale, cast
        loss = Pass(38 * elements / bandwidth, 22 * elements / bandwidth)
    elif assume.blockwise_cross_entropy:
        blocks = -(-x.tokens // max(1, assume.cross_entropy_block_elements // x.vocab))
        loss = Pass(max(10 * elements / bandwidth, 2 * blocks * assume.kernel_launch_s),
                    max(38 * elements / bandwidth, 6 * blocks * assume.kernel_launch_s))
    else:
        loss = Pass(4 * elements / bandwidth, 4 * elements / bandwidth)
    residual = x.residual_tokens * x.h
    return logits + loss + Pass(norm[0] * residual / bandwidth, norm[1] * residual / bandwidth)


def embedding_compute(x: ActivationShape, gpu: GPUSpec) -> Pass:
    """The embedding of one microbatch on the first stage: the lookup, and in backward the dense
    bf16 gradient of the [V/t, h] table that autograd writes before it joins the main grad."""
    bandwidth = gpu.hbm_bandwidth * gpu.hbm_efficiency
    table = x.dtype_bytes * x.vocab / x.tp * x.h
    return Pass(2 * x.dtype_bytes * x.tokens * x.h / bandwidth, 2 * table / bandwidth)

"""GPU checks of fit and speed (issue: sharded init, activation memory, flash ring attention, a lean
gradient path, the performance model): each `check_*() -> dict` skips cleanly without CUDA.

    check_wide_step_vs_model       peak CUDA memory and median step time of an 8B-width 4-layer bf16
                                   model's training step against the performance model's estimates
    check_cross_entropy_kernels    the blockwise bf16 cross-entropy (engine/model/decoder.py) at vocab
                                   128256 against F.cross_entropy on fp32 logits: values and time
    check_ring_block_kernels       one ring-attention block's forward + backward on CUDA (the block kernels
                                   of parallel/block_attention.py) against fused SDPA: values and time

A result is {"status": pass | fail | skip, "reason", ...figures}; scripts/gpu-check.sh runs them
through bench/gpu_check.py's runner (CHECKS there). Timings are reported beside each other, and
judged only where the performance model makes a claim (its predicted step time).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.gpu_checks_fp8 import WIDE, _timed_steps, _trainer  # noqa: E402

MEMORY_TOLERANCE = 0.10
"""|measured / estimated - 1| allowed for the peak of allocated memory: the activation formula is held
to 10% of the saved tensors on CPU (bench/bench_activation_memory.py); weights, gradients and
optimizer state are exact counts."""
STEP_TIME_TOLERANCE = 0.30
"""|measured / predicted - 1| allowed for one GPU's step time: the model prices kernels by efficiency
factors fitted on published multi-GPU runs, not on this GPU's kernels."""


def _skip() -> dict | None:
    return None if torch.cuda.is_available() else {"status": "skip", "reason": "no CUDA device"}


def _gpu_type() -> str:
    """The data-sheet name of this GPU (engine/perf/hardware.py), H100 when none matches."""
    from engine.perf.hardware import known_gpus

    name = torch.cuda.get_device_name()
    return next((gpu for gpu in known_gpus() if gpu in name), "H100")


def _estimate(trainer):
    """The performance model's step estimate of this one-GPU trainer's layout."""
    from engine.perf.hardware import make_cluster
    from engine.perf.inputs import Layout
    from engine.perf.perf_model import estimate_step

    t = trainer.cfg.train
    layout = Layout(dp=1, micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                    recompute=trainer.cfg.model.recompute)
    return estimate_step(trainer.cfg.model, layout, make_cluster(_gpu_type(), gpus_per_node=1))


def _wide_run() -> tuple[object, float, int]:
    """(estimate, median seconds per step, peak allocated bytes) of 8 bf16 steps of the 8B-width model."""
    torch.cuda.reset_peak_memory_stats()
    trainer = _trainer([*WIDE, "precision.dtype=bf16"], 8)
    seconds = _timed_steps(trainer, 3, 5)[1]
    peak = torch.cuda.max_memory_allocated()
    estimate = _estimate(trainer)
    del trainer
    torch.cuda.empty_cache()
    return estimate, seconds, peak


def check_wide_step_vs_model() -> dict:
    """Peak CUDA memory and median step time of an 8B-width 4-layer bf16 training step against the
    performance model's estimates of them."""
    skip = _skip()
    if skip:
        return skip
    estimate, seconds, peak = _wide_run()
    m = estimate.memory
    predicted = m.total - m.reserved  # the reserve stands for the context, NCCL and fragmentation
    memory_ratio, time_ratio = peak / predicted, seconds / estimate.step_time
    failures = [f"{what} {ratio:.2f}x the model's" for what, ratio, tolerance in
                (("peak memory", memory_ratio, MEMORY_TOLERANCE), ("step time", time_ratio, STEP_TIME_TOLERANCE))
                if abs(ratio - 1) > tolerance]
    return {"status": "fail" if failures else "pass", "reason": "; ".join(failures), "gpu": torch.cuda.get_device_name(),
            "peak_allocated_gib": peak / 2**30, "estimated_gib": predicted / 2**30, "memory_measured_over_estimate":
            memory_ratio, "estimate_by_kind_gib": {k: getattr(m, k) / 2**30 for k in
                                                   ("params", "grads", "optimizer", "activations")},
            "measured_ms": seconds * 1e3, "predicted_ms": estimate.step_time * 1e3,
            "time_measured_over_predicted": time_ratio, "mfu_predicted": estimate.mfu,
            "predicted_by_cost_ms": {k: v * 1e3 for k, v in estimate.times.items()},
            "tolerances": {"memory": MEMORY_TOLERANCE, "step_time": STEP_TIME_TOLERANCE}}


def _median_ms(fn: Callable[[], None], repeats: int = 10) -> float:
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_cross_entropy_kernels() -> dict:
    """The blockwise bf16 cross-entropy at vocab 128256 (8192 tokens) against F.cross_entropy on fp32 logits."""
    skip = _skip()
    if skip:
        return skip
    from engine.model.decoder import lm_loss

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(8192, 128256, device="cuda", generator=gen).mul_(2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 128256, (8192,), device="cuda", generator=gen)

    def engine() -> torch.Tensor:
        logits.grad = None
        loss = lm_loss(logits, targets)[0]
        loss.backward()
        return loss

    def plain() -> torch.Tensor:
        logits.grad = None
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        loss.backward()
        return loss

    ours, grad = engine().item(), logits.grad.float().clone()
    theirs = plain().item()
    grad_error = ((logits.grad.float() - grad).norm() / logits.grad.float().norm()).item()
    loss_error = abs(ours - theirs) / abs(theirs)
    ok = loss_error <= 1e-5 and grad_error <= 2.0 ** -7  # fp32 sums; the gradient is rounded to bf16 once
    return {"status": "pass" if ok else "fail", "loss_relative_error": loss_error,
            "grad_relative_error": grad_error, "engine_ms": _median_ms(engine), "fp32_cross_entropy_ms": _median_ms(plain)}


def check_ring_block_kernels() -> dict:
    """One causal ring block (seq 8192, 32 heads, GQA 8) forward + backward on CUDA against fused SDPA."""
    skip = _skip()
    if skip:
        return skip
    import torch.nn.functional as F

    from parallel.block_attention import block_backward, block_forward

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, s, hq, hkv, d = 1, 8192, 32, 8, 128
    q = torch.randn(b, hq, s, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v, grad = (torch.randn(b, h, s, d, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (hkv, hkv, hq))
    scale = d ** -0.5

    def ring_block():
        out, lse = block_forward(q, k, v, scale, True)
        return out, block_backward(grad, q, k, v, out.to(q.dtype), lse, scale, True)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fused():
        for t in leaves:
            t.grad = None
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
        out.backward(grad)
        return out

    out, (dq, dk, dv) = ring_block()
    reference = fused()
    errors = {name: ((a.float() - r.float()).norm() / r.float().norm()).item()
              for name, a, r in (("out", out, reference), ("dq", dq, leaves[0].grad), ("dk", dk, leaves[1].grad),
                                 ("dv", dv, leaves[2].grad))}
    ok = max(errors.values()) <= 2.0 ** -6  # bf16 inputs, fp32 (block) vs fp32-accumulated (flash) math
    return {"status": "pass" if ok else "fail", "relative_errors": errors,
            "ring_block_ms": _median_ms(lambda: ring_block(), 5), "fused_sdpa_ms": _median_ms(fused, 5),
            "note": "the block kernels on CUDA are the fp32 math path (ATen's fused block kernel is CPU-only); "
                    "TE's context-parallel attention is not wired in"}


CHECKS: tuple[Callable[[], dict], ...] = (check_cross_entropy_kernels, check_ring_block_kernels,
                                          check_wide_step_vs_model)
"""Every fit-and-speed GPU check, cheapest first."""

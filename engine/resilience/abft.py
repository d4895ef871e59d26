"""ABFT: checksums over the linear layers' forward GEMMs, and the `gemm_error` fault they catch.

Algorithm-based fault tolerance (Huang and Abraham): for Y = X W^T the column sums of Y equal
(1^T X) W^T, a vector-matrix product: O(MK + KN) work beside the GEMM's O(MKN). Every
`resilience.abft_interval` steps each rank checks every plain local GEMM of its tensor-parallel
layers (parallel/tensor_parallel.py `linear_fn`) and of torch's Linear layers at tp=1 (LoRA and
fp8 GEMMs compute something else: no checks with them), in fp32, against a tolerance derived from the output dtype's epsilon:

    |1^T Y - (1^T X) W^T|_c  <=  (FACTOR eps32 + DTYPE_FACTOR eps(dtype)) ((1^T |X|) |W|^T)_c / sqrt(M K)

((1^T |X|) |W|^T)_c / sqrt(M K) is the size of the accumulated rounding in units of eps: M rows of
K products each, whose errors add like random signs (sqrt(M K) of them, each ~eps x |x w|); the
factors, set from measured clean GEMMs, leave room for the tails (the DTYPE_FACTOR term only for
outputs narrower than fp32). The per-layer worst ratio stays on the device; the
step guard reads them once per step (engine/resilience/guard.py), so checking costs no host sync.
A rank whose GEMM breaks its checksum computed it wrongly on its own (no other rank's value is in
it): the guard names it (`sdc_confirmed`, `faulty_rank`, `layer`) and rewinds.

Only forward GEMMs are checked (the backward's dgrad and wgrad are not). In bf16 the floor is the
dtype's own rounding: with DTYPE_FACTOR x 2^-8 in the bound, an error below a few percent of the
output's largest magnitude (tiny test model) is out of reach, where fp32 catches 1e-3.

The rehearsed fault `gemm_error:rank=R:step=K:rel=E` moves one element of one GEMM's output (the
first checked layer's unless `layer=` names its index) by E x that output's largest magnitude, on
rank R at step K; with `persistent=1`, on every step from K (a failing unit, not a one-off).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Measured here (tests/test_resilience_abft.py prints it): with the checksums summed in fp32, clean
# fp32 GEMMs of the test models reached ~90 (h=256) to ~200 (h=512, seq 256) x eps32 * scale /
# sqrt(MK), and a clean down_proj of the 58M model 1.58 x FACTOR in training; summed in fp64 the
# random test GEMMs reach 0.02 x the tolerance, a rel=1e-3 error 4 x; bf16 outputs' own rounding
# reaches ~1.6 x eps_bf16 * scale / sqrt(MK) on random GEMMs, 16 x in training.
FACTOR = 512.0  # x eps(fp32): the fp32 arithmetic's bound (h=512: clean 0.39 x the tolerance, 1e-3: 4.7 x)
# x eps(dtype): a bf16 (fp16) output's rounding. 16 was too tight in training: a clean bf16 run of the
# tiny model (1000 steps, bench/bench_detection.py) reached 1.01 x it in a down_proj at step 298 and,
# reproducing on every redo, stopped the run; 64 leaves 4x over that worst case.
DTYPE_FACTOR = 64.0


class GemmChecker:
    """Wraps the plain local GEMMs of `chunks`' tensor-parallel layers: checks and rehearsed faults."""

    def __init__(self, chunks, interval: int, injector=None):
        self.interval, self.injector = interval, injector
        self.layers: list[str] = []
        self.worst: dict[int, torch.Tensor] = {}  # layer index -> worst ratio of the step (device)
        self.step = -1
        for chunk in chunks:
            for name, module in chunk.named_modules():
                if getattr(module, "linear_fn", None) is F.linear:  # a tensor-parallel layer's local GEMM
                    module.linear_fn = self._wrap(len(self.layers))
                    self.layers.append(name)
                elif type(module) is torch.nn.Linear:  # tp=1 keeps torch's own layers
                    gemm = self._wrap(len(self.layers))
                    module.forward = lambda x, m=module, gemm=gemm: gemm(x, m.weight, m.bias)
                    self.layers.append(name)

    def begin_step(self, step: int) -> None:
        """A computation of step `step` (0-based) starts: forget the last one's ratios."""
        self.step, self.worst = step, {}

    def checks(self, step: int) -> bool:
        """Whether step `step`'s GEMMs are checked."""
        return bool(self.interval) and step % self.interval == 0

    def _wrap(self, index: int):
        def checked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
            y = F.linear(x, weight, bias)
            self._inject(index, y)
            if self.checks(self.step):
                with torch.no_grad():
                    ratio = checksum_ratio(x, weight, bias, y)
                    prev = self.worst.get(index)
                    self.worst[index] = ratio if prev is None else torch.maximum(prev, ratio)
            return y
        return checked_linear

    def _inject(self, index: int, y: torch.Tensor) -> None:
        if self.injector is None:
            return
        for fault in self.injector.faults:
            if fault.kind != "gemm_error" or (fault.layer or 0) != index:
                continue
            due = fault.step <= self.step + 1 if fault.persistent else fault.step == self.step + 1
            if not due or (not fault.persistent and self.injector.fired(fault)):
                continue
            if not self.injector.fired(fault):
                self.injector.mark_fired(fault, layer=self.layers[index])
            with torch.no_grad():
                flat = y.view(-1)
                flat[fault.element % flat.numel()] += fault.rel * flat.abs().max()

    def report(self) -> Optional[tuple[str, float]]:
        """(layer, ratio) of the step's worst GEMM if a checksum failed (ratio > 1), else None.
        One host read for the whole step."""
        if not self.worst:
            return None
        indices = sorted(self.worst)
        ratios = torch.stack([self.worst[i] for i in indices]).float().cpu()
        top = int(ratios.argmax())
        return (self.layers[indices[top]], float(ratios[top])) if float(ratios[top]) > 1.0 else None


def checksum_ratio(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """max over columns of |1^T Y - (1^T X) W^T| / tolerance (a 0-d fp32 tensor; > 1: a failed checksum)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    y2 = y.reshape(-1, y.shape[-1])
    w = weight.float()
    m, k = x2.shape
    # The checksums themselves in fp64 (vector work, O(MK + KN)): their own rounding, which grows with
    # M when a column's outputs share a sign, must not eat the bound meant for the GEMM's.
    expected = x2.double().sum(0) @ w.double().t()
    if bias is not None:
        expected = expected + m * bias.double()
    scale = x2.abs().sum(0) @ w.abs().t()
    eps32 = torch.finfo(torch.float32).eps
    eps = torch.finfo(y.dtype).eps if y.dtype.is_floating_point else eps32
    # fp32 arithmetic (the GEMM's accumulation and these sums), plus a narrower output's rounding
    bound = FACTOR * eps32 + (DTYPE_FACTOR * eps if eps > eps32 else 0.0)
    tolerance = bound * scale / math.sqrt(m * k) + torch.finfo(torch.float32).tiny
    return ((y2.double().sum(0) - expected).abs() / tolerance).max().float()

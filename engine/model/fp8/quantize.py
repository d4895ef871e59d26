"""fp8 formats, Transformer Engine's scale rules, quantisation at three granularities, the fp8 GEMM.

A quantised operand is fp8 data q and fp32 dequantisation scales s_inv: the value it stands for is
q * s_inv, with one s_inv per tensor, per 1-D block (1x128 for blockwise, 1x32 for MXFP8, along
the GEMM's contraction dimension) or per 2-D block (128x128 weights). Every rule follows TE's
kernels (transformer_engine/common/recipe/recipe_common.cuh, util/ptx*.cuh):

- scale from amax (current, per-tensor and block): scale = fp8_max / amax in fp32 (round to
  nearest), an infinite scale becomes the input type's largest finite value, an amax of zero,
  inf or nan gives scale 1, and with power-of-two scales the mantissa bits are cleared (rounding
  the scale down); s_inv = 1 / scale.
- MXFP8 (OCP MX v1.0 blocks of 32, E8M0 scales): s_inv = 2^e with e the fp32 exponent of
  amax * (1 / fp8_max) rounded up (TE's float_to_e8m0), so no element of a block saturates. The
  OCP spec's own example rule (2^(floor(log2 amax) - emax)) rounds down and clips the top of the
  block; TE's rounding is the one the GPU runs, so it is the one emulated.
- the cast: x * scale, saturated to +-fp8_max, rounded to nearest even (torch's float8 cast).

The GEMM (`fp8_gemm`, TN layout: y = a b^T with a [m, k], b [n, k]) multiplies the exact fp8
values. With per-tensor scales: a bf16 GEMM of the fp8 values (each is a bf16 value; fp32
accumulation) times s_inv_a * s_inv_b. With block scales: each operand dequantised, in bf16 when
its scales are powers of two (q * 2^e is then exact in bf16) and in fp32 otherwise, and one GEMM in
that precision: sum_k (q_a s_a)(q_b s_b) is the blockwise GEMM's sum over k-blocks of
s_a s_b * (q_a . q_b) up to fp32 rounding. Nothing here reads a tensor back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
"""Largest finite value of each fp8 format."""

FORMATS = {"hybrid": (E4M3, E5M2), "e4m3": (E4M3, E4M3)}
"""precision.fp8_format -> (forward dtype: inputs and weights, backward dtype: output gradients), as TE's Format."""

_EXPONENT_MASK = -8388608  # 0xFF800000 as int32: sign and exponent bits of an fp32


def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def scale_from_amax(amax: Tensor, fp8_max: float, power_2: bool = False, epsilon: float = 0.0,
                    value_for_inf: float = _largest(torch.float32)) -> Tensor:
    """TE's compute_scale_from_amax: fp8_max / amax (fp32), inf -> value_for_inf, bad amax -> 1."""
    amax = amax.float()
    if epsilon > 0:
        amax = amax.clamp_min(epsilon)
    scale = torch.full_like(amax, fp8_max) / amax
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, value_for_inf), scale)
    if power_2:
        scale = (scale.view(torch.int32) & _EXPONENT_MASK).view(torch.float32)
    bad = (amax == 0) | ~torch.isfinite(amax)
    return torch.where(bad, torch.ones_like(scale), scale)


def e8m0_exponent(amax: Tensor, fp8_max: float) -> Tensor:
    """The biased E8M0 exponent (int32, 0..255) of an MX block: float_to_e8m0(amax * (1 / fp8_max)), rounded up."""
    value = amax.float() * (1.0 / fp8_max)  # the scalar enters the fp32 kernel as fp32: TE's max_norm_rcp
    bits = value.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    # Round up unless the value is exact, already the largest finite exponent, or a subnormal at
    # most 2^-127 (which E8M0's smallest code, 2^-127, already covers).
    up = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    exponent = exponent + up.to(torch.int32)
    exponent = torch.where(torch.isinf(value), torch.full_like(exponent, 0xFE), exponent)
    return torch.where(torch.isnan(value), torch.full_like(exponent, 0xFF), exponent)


def e8m0_scales(exponent: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, scale_inv) in fp32 of biased E8M0 exponents: 2^(127 - e) and 2^(e - 127); e = 255 is nan."""
    one = torch.ones_like(exponent, dtype=torch.float32)
    scale = torch.ldexp(one, (127 - exponent).float())
    scale_inv = torch.ldexp(one, (exponent - 127).float())
    nan = exponent == 0xFF
    return scale.masked_fill(nan, float("nan")), scale_inv.masked_fill(nan, float("nan"))


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """saturate(x * scale) rounded to the fp8 `dtype` (round to nearest even, as TE's cast); scale broadcasts."""
    limit = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


def decode(q: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 values as `dtype`, bitwise what `q.to(dtype)` gives: a lookup in torch's own conversion of
    the 256 codes (CPU's elementwise fp8 decode is scalar code, ~4x slower than the lookup)."""
    codes = torch.arange(256, dtype=torch.int32, device=q.device).to(torch.uint8)
    table = codes.view(q.dtype).to(dtype)
    return table.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


@dataclass
class Quantized:
    """A 2-D operand [rows, k] in fp8 with its dequantisation scales.

    `scale_inv` is 0-d (per tensor) or [rows / block_rows, k / block_cols]; `power_2` says every
    scale is a power of two (dequantised values are then exact in bf16).
    """

    data: Tensor
    scale_inv: Tensor
    block: tuple[int, int]
    power_2: bool

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole operand."""
        return self.scale_inv.dim() == 0

    def t(self) -> "Quantized":
        """The transposed operand: valid where the blocks are symmetric (per tensor, square 2-D blocks)."""
        return Quantized(self.data.t(), self.scale_inv if self.per_tensor else self.scale_inv.t(),
                         self.block[::-1], self.power_2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """q * s_inv in `dtype` (exact in fp32 up to one rounding; exact in bf16 when power_2)."""
        values = decode(self.data, torch.float32)
        if self.per_tensor:
            return (values * self.scale_inv).to(dtype)
        rows, cols = self.block
        m, k = values.shape
        tiles = values.reshape(m // rows, rows, k // cols, cols) * self.scale_inv[:, None, :, None]
        return tiles.reshape(m, k).to(dtype)


def _check_blocks(x: Tensor, rows: int, cols: int) -> None:
    if x.dim() != 2 or x.shape[0] % rows or x.shape[1] % cols:
        # Config validation refuses layouts whose GEMMs do not tile; reaching this is a caller bug.
        raise ValueError(f"fp8 block quantisation: shape {tuple(x.shape)} does not tile into {rows}x{cols} blocks")


def quantize_per_tensor(x: Tensor, scale: Tensor, dtype: torch.dtype, power_2: bool = False) -> Quantized:
    """x at one (0-d) scale; s_inv = 1 / scale."""
    return Quantized(quantize(x, scale, dtype), torch.reciprocal(scale.float()), tuple(x.shape), power_2)


def quantize_blocks(x: Tensor, rows: int, cols: int, dtype: torch.dtype, power_2: bool = False,
                    epsilon: float = 0.0) -> Quantized:
    """x [m, k] with one scale per rows x cols block (TE's Float8BlockQuantizer: 1x128 or 128x128)."""
    _check_blocks(x, rows, cols)
    m, k = x.shape
    tiles = x.reshape(m // rows, rows, k // cols, cols)
    amax = tiles.abs().amax(dim=(1, 3)).float()
    scale = scale_from_amax(amax, FP8_MAX[dtype], power_2, epsilon, _largest(x.dtype))
    data = quantize(tiles, scale[:, None, :, None], dtype).reshape(m, k)
    return Quantized(data, torch.reciprocal(scale), (rows, cols), power_2)


def quantize_mx(x: Tensor, dtype: torch.dtype, block: int = 32) -> Quantized:
    """x [m, k] with one E8M0 scale per 1 x `block` run along k (TE's MXFP8Quantizer, OCP MX)."""
    _check_blocks(x, 1, block)
    m, k = x.shape
    runs = x.reshape(m, k // block, block)
    scale, scale_inv = e8m0_scales(e8m0_exponent(runs.abs().amax(dim=-1), FP8_MAX[dtype]))
    data = quantize(runs, scale[..., None], dtype).reshape(m, k)
    return Quantized(data, scale_inv, (1, block), True)


def fp8_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> Tensor:
    """a b^T for a [m, k], b [n, k] quantised along k: the fp8 GEMM's value, rounded once to `out_dtype`
    (twice with per-tensor scales: the bf16 GEMM's output, then the descaled value)."""
    if a.per_tensor and b.per_tensor:
        product = torch.matmul(decode(a.data, torch.bfloat16), decode(b.data, torch.bfloat16).t())
        return (product.float() * (a.scale_inv * b.scale_inv)).to(out_dtype)
    dtype = torch.bfloat16 if a.power_2 and b.power_2 else torch.float32
    return torch.matmul(a.dequantize(dtype), b.dequantize(dtype).t()).to(out_dtype)

"""The four fp8 recipes as quantisers of a linear layer's three tensors, and delayed scaling's state.

Every fp8 linear runs three GEMMs (TN layout, contraction along the last dimension of both
operands): fprop y = x W^T, dgrad dx = dy W, wgrad dW = dy^T x. Each tensor enters two of them,
once contracted along its last dimension ("rowwise") and once along its first ("columnwise",
as the transposed operand). A quantiser returns both (`both(t) -> (t quantised along its last
dim [m, k], t^T quantised along m [k, m])`).

    recipe      input x             weight W               output gradient dy    formats (default)
    delayed     per tensor, scale   per tensor             per tensor            E4M3 / E5M2 (hybrid)
                from the amax history of past steps (TE's DelayedScaling)
    tensorwise  per tensor, scale   per tensor             per tensor            E4M3 / E5M2 (hybrid)
                from this tensor's amax (TE's Float8CurrentScaling)
    blockwise   1x128 tiles         128x128 blocks         1x128 tiles           E4M3 (TE's Float8BlockScaling,
                fp32 scales (power-of-two with precision.fp8_power_2_scales)     DeepSeek-V3)
    mxfp8       1x32 E8M0           1x32 E8M0              1x32 E8M0             E4M3 (TE's MXFP8BlockScaling)

A per-tensor operand and a 128x128-block operand are the same quantisation in both orientations
(the transpose is a view); 1-D blocks are quantised a second time along the other dimension from
the high-precision tensor, as TE does, since transposed tiles cover other elements.

Delayed scaling (`DelayedScalingState`) keeps TE's amax history: a [L, N] fp32 tensor for the N
tensors of this rank's fp8 layers, row 0 this step's amaxes (the max over its microbatches),
rows 1.. the previous L - 1 steps. After the optimizer step, row 0 is all-reduced (max) once over
the ranks that see other parts of the same tensors, the scales become
scale = (fp8_max / 2^margin) / amax_ref with amax_ref the history's max (`max`) or row 0
(`most_recent`), a zero or non-finite amax_ref keeps the previous scale and an infinite scale
becomes fp32's max (TE's fused_amax_and_scale_update), then the history rolls and row 0 restarts
from zero. Scales start at 1. All of it stays on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from engine.model.fp8.quantize import (FORMATS, FP8_MAX, Quantized, quantize_blocks, quantize_mx,
                                       quantize_per_tensor, scale_from_amax)

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
"""precision.fp8_recipe values."""

DEFAULT_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
"""precision.fp8_format when left out: Transformer Engine's default for the recipe."""

BLOCK = {"blockwise": 128, "mxfp8": 32}
"""Scaling block length of the block recipes (blockwise weights: BLOCK x BLOCK)."""

ROLES = ("input", "weight", "grad_output")
"""The tensors of a linear layer that are quantised, in the order of their state columns."""


class Quantizer(Protocol):
    """One tensor role's quantisation."""

    def both(self, x: Tensor) -> tuple[Quantized, Quantized]:
        """(x [m, k] quantised along k, x^T [k, m] quantised along m)."""


class CurrentScaling:
    """Per-tensor scale from this tensor's own amax (tensorwise)."""

    def __init__(self, dtype: torch.dtype, power_2: bool):
        self.dtype, self.power_2 = dtype, power_2

    def both(self, x: Tensor) -> tuple[Quantized, Quantized]:
        scale = scale_from_amax(x.detach().abs().amax(), FP8_MAX[self.dtype], self.power_2,
                                value_for_inf=torch.finfo(x.dtype).max)
        q = quantize_per_tensor(x, scale, self.dtype, self.power_2)
        return q, q.t()


class OneDimBlocks:
    """1 x block tiles along the contraction dimension, both orientations quantised from x."""

    def __init__(self, dtype: torch.dtype, block: int, rule: str):
        self.dtype, self.block, self.rule = dtype, block, rule  # rule: fp32 | power_2 | e8m0

    def along_rows(self, x: Tensor) -> Quantized:
        """x [m, k] with one scale per 1 x block run of each row."""
        if self.rule == "e8m0":
            return quantize_mx(x, self.dtype, self.block)
        return quantize_blocks(x, 1, self.block, self.dtype, power_2=self.rule == "power_2")

    def both(self, x: Tensor) -> tuple[Quantized, Quantized]:
        return self.along_rows(x), self.along_rows(x.t())


class SquareBlocks:
    """block x block tiles (blockwise weights): one quantisation serves both orientations."""

    def __init__(self, dtype: torch.dtype, block: int, power_2: bool):
        self.dtype, self.block, self.power_2 = dtype, block, power_2

    def both(self, x: Tensor) -> tuple[Quantized, Quantized]:
        q = quantize_blocks(x, self.block, self.block, self.dtype, self.power_2)
        return q, q.t()


class DelayedScalingState:
    """TE's amax history [L, N] and scales [N] of every delayed-scaling tensor of this rank (see the module doc)."""

    def __init__(self, history_len: int, compute_algo: str, margin: int):
        self.history_len, self.compute_algo, self.margin = history_len, compute_algo, margin
        self.columns: list[tuple[str, str, float]] = []  # (layer, role, fp8_max) per column
        self.amax_history: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None
        self.scaled_max: Optional[Tensor] = None

    def add(self, layer: str, dtypes: tuple[torch.dtype, ...]) -> int:
        """Columns for one layer's roles (in ROLES order); returns the first."""
        first = len(self.columns)
        self.columns += [(layer, role, FP8_MAX[dtype]) for role, dtype in zip(ROLES, dtypes)]
        return first

    def allocate(self, device: torch.device) -> None:
        """The tensors, once every layer is added: history zeros, scales 1 (TE's initial state)."""
        n = len(self.columns)
        self.amax_history = torch.zeros(self.history_len, n, dtype=torch.float32, device=device)
        self.scale = torch.ones(n, dtype=torch.float32, device=device)
        maxima = torch.tensor([fp8_max for _, _, fp8_max in self.columns], dtype=torch.float32, device=device)
        self.scaled_max = maxima * 2.0 ** -self.margin

    def observe(self, column: int, x: Tensor) -> None:
        """Fold max |x| into this step's amax of `column` (several microbatches take the max)."""
        current = self.amax_history[0, column]
        torch.maximum(current, x.detach().abs().amax().float(), out=current)

    def update(self, amax_reduce: Optional[Callable[[Tensor], None]] = None) -> None:
        """End of a step: reduce row 0 in place (max over ranks), set the scales, roll the history."""
        if not self.columns:
            return
        current = self.amax_history[0]
        if amax_reduce is not None:
            amax_reduce(current)
        amax = current if self.compute_algo == "most_recent" else self.amax_history.amax(dim=0)
        new = self.scaled_max / amax
        new = torch.where(torch.isinf(new), torch.full_like(new, torch.finfo(torch.float32).max), new)
        self.scale.copy_(torch.where(torch.isfinite(amax) & (amax > 0), new, self.scale))
        self.amax_history.copy_(torch.roll(self.amax_history, -1, 0))
        self.amax_history[0].zero_()

    def layer_tensors(self) -> dict[str, Tensor]:
        """Views of each layer's history [L, 3] and scales [3], by 'fp8/<layer>/...' (checkpoint keys)."""
        views, layers = {}, {}
        for column, (layer, _, _) in enumerate(self.columns):
            layers.setdefault(layer, column)
        for layer, first in layers.items():
            cols = slice(first, first + len(ROLES))
            views[f"fp8/{layer}/amax_history"] = self.amax_history[:, cols]
            views[f"fp8/{layer}/scale"] = self.scale[cols]
        return views


class DelayedScaling:
    """One column of the delayed-scaling state: quantise at its scale, record the amax for the next."""

    def __init__(self, state: DelayedScalingState, column: int, dtype: torch.dtype):
        self.state, self.column, self.dtype = state, column, dtype

    def both(self, x: Tensor) -> tuple[Quantized, Quantized]:
        self.state.observe(self.column, x)
        q = quantize_per_tensor(x, self.state.scale[self.column], self.dtype)
        return q, q.t()


@dataclass
class LinearQuantizers:
    """The quantisers of one linear layer's input, weight and output gradient."""

    input: Quantizer
    weight: Quantizer
    grad_output: Quantizer


@dataclass(frozen=True)
class RecipeSettings:
    """What a recipe needs from precision.* (engine.config.PrecisionConfig)."""

    recipe: str = "delayed"
    format: Optional[str] = None
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    power_2_scales: bool = False

    @classmethod
    def from_config(cls, precision) -> "RecipeSettings":
        """From a PrecisionConfig."""
        return cls(precision.fp8_recipe, precision.fp8_format, precision.fp8_margin, precision.fp8_amax_history_len,
                   precision.fp8_amax_compute_algo, precision.fp8_power_2_scales)

    @property
    def fp8_format(self) -> str:
        """The format in use: the one set, or the recipe's TE default."""
        return self.format or DEFAULT_FORMAT[self.recipe]

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(forward dtype, backward dtype)."""
        return FORMATS[self.fp8_format]


class Fp8Recipe:
    """A recipe's quantisers per layer and, for delayed scaling, its state and step update."""

    def __init__(self, settings: RecipeSettings):
        self.settings = settings
        self.delayed = (DelayedScalingState(settings.amax_history_len, settings.amax_compute_algo, settings.margin)
                        if settings.recipe == "delayed" else None)

    @property
    def name(self) -> str:
        """precision.fp8_recipe."""
        return self.settings.recipe

    def quantizers(self, layer: str) -> LinearQuantizers:
        """The quantisers of linear layer `layer` (delayed: its columns of the state)."""
        s = self.settings
        forward, backward = s.dtypes
        if s.recipe == "delayed":
            first = self.delayed.add(layer, (forward, forward, backward))
            return LinearQuantizers(*(DelayedScaling(self.delayed, first + i, dtype)
                                      for i, dtype in enumerate((forward, forward, backward))))
        if s.recipe == "tensorwise":
            return LinearQuantizers(CurrentScaling(forward, s.power_2_scales), CurrentScaling(forward, s.power_2_scales),
                                    CurrentScaling(backward, s.power_2_scales))
        block = BLOCK[s.recipe]
        if s.recipe == "mxfp8":
            return LinearQuantizers(OneDimBlocks(forward, block, "e8m0"), OneDimBlocks(forward, block, "e8m0"),
                                    OneDimBlocks(backward, block, "e8m0"))
        rule = "power_2" if s.power_2_scales else "fp32"
        return LinearQuantizers(OneDimBlocks(forward, block, rule), SquareBlocks(forward, block, s.power_2_scales),
                                OneDimBlocks(backward, block, rule))

    def allocate(self, device: torch.device) -> None:
        """After every layer has its quantisers: the state tensors on `device`."""
        if self.delayed is not None:
            self.delayed.allocate(device)

    def update(self, amax_reduce: Optional[Callable[[Tensor], None]] = None) -> None:
        """After the optimizer step: delayed scaling's reduction and scale update (others keep no state)."""
        if self.delayed is not None:
            self.delayed.update(amax_reduce)

    def state_tensors(self) -> dict[str, Tensor]:
        """The recipe's state as views by checkpoint key (empty for the stateless recipes)."""
        return self.delayed.layer_tensors() if self.delayed is not None and self.delayed.scale is not None else {}

"""The `precision` section of the run configuration: the training dtype and the fp8 recipes' knobs.

A section of engine/config.py's ApogeeConfig, in a module of its own because the fp8 recipes
(engine/model/fp8/) brought ten fields; import it from engine.config like every other section.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class PrecisionConfig:
    """Numerics."""

    dtype: str = "fp32"
    """fp32, bf16 (fp32 master weights) or fp8 (bf16 with the decoder GEMMs in fp8: Transformer
    Engine on CUDA, emulated exactly elsewhere; engine/model/fp8/)."""
    fp8_recipe: str = "delayed"
    """How fp8 tensors are scaled: delayed (per tensor, from an amax history of past steps; TE's
    DelayedScaling), tensorwise (per tensor, from the tensor's own amax; Float8CurrentScaling),
    blockwise (1x128 tiles of inputs and gradients, 128x128 blocks of weights, fp32 scales; DeepSeek-V3,
    Float8BlockScaling) or mxfp8 (1x32 blocks with power-of-two E8M0 scales; OCP MX, MXFP8BlockScaling)."""
    fp8_format: Optional[str] = None
    """hybrid (E4M3 forward, E5M2 gradients) or e4m3 (everywhere); None takes the recipe's TE default:
    hybrid for delayed and tensorwise, e4m3 for blockwise and mxfp8."""
    fp8_margin: int = 0
    """delayed: scale = fp8_max / amax / 2^margin (headroom above the recorded amax)."""
    fp8_amax_history_len: int = 1024
    """delayed: steps of amax history the scale is computed from (TE's default 1024)."""
    fp8_amax_compute_algo: str = "max"
    """delayed: max (the largest amax of the history) or most_recent (this step's)."""
    fp8_power_2_scales: bool = False
    """tensorwise and blockwise: round every scale down to a power of two (TE's power_2_scale; TE's
    own blockwise default on GPUs, required on Blackwell). mxfp8 scales are powers of two always."""
    fp8_first_layers_bf16: int = 0
    """Decoder layers at the start kept in bf16 (Megatron's --num-layers-at-start-in-bf16)."""
    fp8_last_layers_bf16: int = 0
    """Decoder layers at the end kept in bf16 (Megatron's --num-layers-at-end-in-bf16)."""
    fp8_backend: str = "auto"
    """auto: Transformer Engine when transformer_engine.pytorch imports and the device is CUDA, else the
    emulation; emulation: always the emulation (the same numbers, not fast)."""

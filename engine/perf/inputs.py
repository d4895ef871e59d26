"""What the performance model is asked about: a layout with its batch shape, and the software
assumptions (how the code that runs the layout behaves), with defaults that describe this engine.

`Layout` is the engine's one layout type (parallel.layout.ParallelLayout) plus the batch shape
and the recomputation the model prices. `Assumptions` are the knobs that are not hardware; the
defaults are the engine as built (checked against its code, see each field), and `--assume
KEY=VALUE` on `apogee plan` describes another stack, key by key (flash_attention=false) or as a
preset (`stack=megatron-2021`, `stack=megatron`, `stack=llama3`, `stack=torchtitan`: STACKS),
which is how engine/perf/calibration.py prices the published runs.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

from parallel.layout import ParallelLayout

GIB = 2**30
"""Bytes in a GiB."""

RECOMPUTE_MODES = ("none", "selective", "full")
"""Activation recomputation as the engine implements it (engine/model/decoder.py): selective
recomputes the attention core only; full recomputes every layer from its input."""


class PerfModelError(ValueError):
    """An input the model cannot use; the message names the field, the value and what is valid."""


@dataclass
class Layout(ParallelLayout):
    """A parallel layout (the engine's own type, parallel/layout.py) with the batch shape and the
    recomputation that the model prices; rank order tp-cp-ep-dp-pp (tp fastest), as the engine."""

    dp: Optional[int] = 1
    """Data-parallel size."""
    micro_batch_size: int = 1
    """Samples per microbatch per data-parallel rank."""
    global_batch_size: int = 1
    """Samples per optimizer step."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (whole layer)."""

    @property
    def world(self) -> int:
        """GPUs used: tp * cp * dp * pp."""
        return self.world_size

    @property
    def microbatches(self) -> int:
        """Microbatches per step per data-parallel rank, m = B / (b * dp); PerfModelError if not whole."""
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise PerfModelError(f"global_batch_size={self.global_batch_size}: must be a multiple of "
                                 f"micro_batch_size*dp = {self.micro_batch_size}*{self.dp}")
        return self.global_batch_size // (self.micro_batch_size * self.dp)


@dataclass(frozen=True)
class Assumptions:
    """Software behaviour the model prices, stated once; defaults describe this engine as built."""

    flash_attention: bool = True
    """The attention core of cp=1 runs a fused flash kernel (the engine: SDPA) that skips masked
    blocks and never writes scores; False models 2021 Megatron: batched GEMMs over the whole score
    matrix plus the fused softmax's traffic (and no flash memory saving)."""
    cp_attention: str = "matmul"
    """Ring attention's blocks at cp > 1: 'matmul' is what parallel/block_attention.py runs off CPU
    (fp32 matmuls on CUDA cores with materialised fp32 scores, the causal diagonal block computed
    in full); 'flash' a fused kernel per block in the model's dtype (TE's or Llama 3's CP)."""
    fused_elementwise: bool = False
    """Norms, RoPE, SwiGLU and residual adds as fused kernels (Megatron, torch.compile); False is
    the engine's eager ops, whose RMSNorm alone makes ~10 fp32 passes (engine/perf/compute.py)."""
    tp_overlap: float = 0.0
    """Fraction of TP/SP communication hidden behind GEMMs (0: the engine does not overlap)."""
    pp_overlap: float = 0.0
    """Fraction of PP p2p time hidden behind compute (0: the engine's batches block)."""
    pp_scatter_gather: bool = False
    """Each TP rank sends 1/tp of a stage's activation and the next stage all-gathers it over NVLink
    (Megatron's scatter-gather optimisation); False: the engine sends its whole local activation
    (already 1/tp under sequence parallelism)."""
    grad_reduce_overlap: bool = True
    """Gradient buckets are reduced during the last backward as they complete (the engine:
    parallel/data_parallel.py, parallel/zero.py); False: after backward (2021 Megatron)."""
    param_gather_overlap: bool = False
    """ZeRO-1/2's parameter all-gather hidden behind the next forward (Megatron's
    --overlap-param-gather) whatever the layout says; False: as the layout's
    parallel.overlap_param_gather runs the engine (parallel/zero.py; default off)."""
    grad_reduce_bytes: int = 4
    """Bytes per gradient element on the wire: 4 with optim.grad_reduce_dtype=fp32 (the default),
    2 with bf16 (parallel/data_parallel.py, parallel/zero.py reduce a bf16 copy of each bucket)."""
    grad_fingerprint_sync: bool = False
    """Each gradient bucket is fingerprinted with a host sync before its reduction. The engine's
    step guard no longer syncs there: its fingerprints stay on the device and are read once at a
    replica-check step (engine/resilience/guard.py); True models the old engine."""
    blockwise_cross_entropy: bool = True
    """At tp=1 the engine's bf16 loss walks the logits in blocks of cross_entropy_block_elements /
    vocab rows, ~10 eager kernels per block (engine/model/decoder.py); False: a few fused passes."""
    cross_entropy_block_elements: int = 2**27
    """fp32 elements per block of the engine's blockwise loss on a GPU (engine/model/decoder.py
    CE_BLOCK_ELEMENTS['cuda']): a few large blocks, so the loss is bandwidth-bound, not launch-bound."""
    kernel_launch_s: float = 8e-6
    """Host time per eager kernel launch: the floor of a tiny kernel, paid by the blockwise loss."""
    overlap_slowdown: float = 0.15
    """Fraction by which compute slows while a collective runs beside it: NCCL's kernels take
    ~16-24 of an H100's 132 SMs and part of its HBM bandwidth."""
    straggler_jitter: float = 0.01
    """Relative spread (one sigma) of a GPU's compute time between GPUs (power, clocks, thermals):
    a step synchronised over N GPUs waits for the slowest, ~ sigma * sqrt(2 ln N) above the mean."""
    matmul_efficiency: Optional[float] = None
    """Override the GPU's achievable fraction of peak for GEMMs (hardware.py's data sheet value)."""
    attention_efficiency: Optional[float] = None
    """Override the GPU's achievable fraction of peak for flash attention."""
    optimizer_bytes_per_param: float = 30.0
    """HBM bytes per locally updated parameter in Adam (read fp32 master, m, v, grad; write them
    and the bf16 copy)."""
    reserved_bytes: float = 3 * GIB
    """Memory lost to the CUDA context, NCCL buffers and allocator fragmentation."""


STACKS = {
    "engine": {},
    "megatron-2021": dict(flash_attention=False, fused_elementwise=True, grad_reduce_overlap=False, grad_reduce_bytes=2,
                          grad_fingerprint_sync=False, blockwise_cross_entropy=False, pp_scatter_gather=True),
    "megatron": dict(fused_elementwise=True, param_gather_overlap=True, grad_fingerprint_sync=False,
                     blockwise_cross_entropy=False, cp_attention="flash"),
    "llama3": dict(fused_elementwise=True, param_gather_overlap=True, grad_fingerprint_sync=False,
                   blockwise_cross_entropy=False, cp_attention="flash"),
    "torchtitan": dict(grad_fingerprint_sync=False, blockwise_cross_entropy=False, cp_attention="flash"),
}
"""Assumptions of known training stacks, `--assume stack=NAME` (other keys then override them):
this engine; 2021 Megatron (Narayanan et al.: unfused attention, fused element-wise kernels,
gradients all-reduced in fp16 after backward, scatter-gather p2p); Megatron-Core/NeMo and
Llama 3's stack (fused kernels, distributed optimizer with overlapped gradient reduction and
parameter gather, fused loss, a fused kernel per CP block); torchtitan eager (FSDP2, SDPA)."""


def assumption_keys() -> tuple[str, ...]:
    """Names `--assume` accepts (`stack` picks a preset of the others)."""
    return ("stack", *(f.name for f in dataclasses.fields(Assumptions)))


def parse_assumptions(pairs: list[str], option: str = "--assume") -> Assumptions:
    """Assumptions from 'KEY=VALUE' strings (a stack=NAME preset first, then the other keys over it);
    PerfModelError names the option, key and what is valid."""
    hints = typing.get_type_hints(Assumptions)
    values = {}
    for pair in sorted(pairs, key=lambda p: not p.startswith("stack=")):
        key, sep, text = pair.partition("=")
        if sep and key == "stack":
            if text not in STACKS:
                raise PerfModelError(f"{option} stack={text!r}: expected one of {', '.join(STACKS)}")
            values.update(STACKS[text])
            continue
        if not sep or key not in hints:
            raise PerfModelError(f"{option} {pair!r}: expected KEY=VALUE with KEY one of {', '.join(assumption_keys())}")
        values[key] = _convert(hints[key], text, f"{option} {key}")
    if values.get("cp_attention", "matmul") not in ("matmul", "flash"):
        raise PerfModelError(f"{option} cp_attention={values['cp_attention']!r}: expected matmul or flash")
    for key in ("tp_overlap", "pp_overlap", "overlap_slowdown", "matmul_efficiency", "attention_efficiency"):
        if values.get(key) is not None and not 0 <= values[key] <= 1:
            raise PerfModelError(f"{option} {key}={values[key]}: expected a fraction in [0, 1]")
    return Assumptions(**values)


def _convert(kind, text: str, what: str):
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise PerfModelError(f"{what}={text!r}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return base(text)
    except ValueError:
        raise PerfModelError(f"{what}={text!r}: expected a {base.__name__}") from None

"""Which fp8 path runs, and what each recipe asks of the hardware and of the GEMM shapes.

precision.fp8_backend=auto runs Transformer Engine when `transformer_engine.pytorch` imports and
the device is CUDA, the emulation otherwise (CPU, or a GPU without TE); `emulation` always
runs the emulation (correct, not fast; the oracle the GPU checks compare TE against). The log
line says which path runs and why.

Transformer Engine's requirements (transformer_engine/pytorch/quantization.py and the recipe
docs): delayed and tensorwise need compute capability 8.9+ (Ada, Hopper, Blackwell), blockwise
9.0+ with CUDA 12.9+, MXFP8 10.x (Blackwell; not 12.x); GEMM operands tile: for the per-tensor
recipes every width a multiple of 16 and the token count of 8, for blockwise every width and the
token count a multiple of 128, for MXFP8 of 32. The emulation computes the same numbers, so the
same shapes are required of it: a config that runs on CPU runs on the GPU.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "emulation")
"""precision.fp8_backend values."""

ALIGNMENT = {"delayed": (16, 8), "tensorwise": (16, 8), "blockwise": (128, 128), "mxfp8": (32, 32)}
"""recipe -> (multiple every GEMM width must be, multiple the GEMM's token count must be)."""

HARDWARE = {
    "delayed": ((8, 9), None, None, "compute capability 8.9+ (Ada, Hopper, Blackwell)"),
    "tensorwise": ((8, 9), None, None, "compute capability 8.9+ (Ada, Hopper, Blackwell)"),
    "blockwise": ((9, 0), None, (12, 9), "compute capability 9.0+ (Hopper, Blackwell) and CUDA 12.9+"),
    "mxfp8": ((10, 0), (12, 0), None, "compute capability 10.x (Blackwell B200/GB200)"),
}
"""recipe -> (lowest compute capability, first capability not supported, lowest CUDA, in words)."""


def import_transformer_engine():
    """(transformer_engine.pytorch, "") or (None, why it does not import)."""
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # ImportError, or TE's own import failing on a CUDA/ABI mismatch
        return None, f"{type(err).__name__}: {err}".splitlines()[0]
    return te, ""


def choose_backend(setting: str, device: torch.device,
                   importer: Callable[[], tuple] = import_transformer_engine) -> tuple[str, str]:
    """('te' or 'emulation', why) for precision.fp8_backend=`setting` on `device`."""
    if setting == "emulation":
        return "emulation", "precision.fp8_backend=emulation"
    if device.type != "cuda":
        return "emulation", f"the device is {device.type}; Transformer Engine needs CUDA"
    te, why = importer()
    if te is None:
        return "emulation", f"transformer_engine.pytorch does not import ({why})"
    version = getattr(sys.modules.get("transformer_engine"), "__version__", "(version unknown)")
    return "te", f"transformer_engine {version} on {device}"


def describe(recipe: str, fp8_format: str, backend: str, why: str) -> str:
    """The log line of the path that runs."""
    path = "Transformer Engine" if backend == "te" else "the PyTorch emulation (exact, not fast)"
    return f"fp8 recipe {recipe} ({fp8_format}) runs through {path}: {why}"


def _version(text: Optional[str]) -> tuple[int, ...]:
    return tuple(int(part) for part in (text or "0").split(".")[:2] if part.isdigit())


def runs_on(recipe: str, capability: tuple[int, int], cuda_version: Optional[str]) -> bool:
    """Whether Transformer Engine runs `recipe` on a GPU of `capability` with CUDA `cuda_version`."""
    lowest, beyond, cuda, _ = HARDWARE[recipe]
    if tuple(capability) < lowest or (beyond is not None and tuple(capability) >= beyond):
        return False
    return cuda is None or _version(cuda_version) >= cuda


def hardware_problem(recipe: str, capability: tuple[int, int], cuda_version: Optional[str]) -> Optional[str]:
    """None if TE runs `recipe` here, else why not and what would work (for a ConfigError)."""
    if runs_on(recipe, capability, cuda_version):
        return None
    others = [r for r in HARDWARE if runs_on(r, capability, cuda_version)]
    here = f"compute capability {capability[0]}.{capability[1]}, CUDA {cuda_version}"
    instead = f"recipes this GPU runs: {', '.join(others)}; or " if others else ""
    return (f"Transformer Engine runs {recipe} on {HARDWARE[recipe][3]}; this GPU has {here}; {instead}"
            f"set precision.fp8_backend=emulation (the same numbers, not fast)")


def local_gemm_widths(model, tp: int) -> dict[str, tuple[int, int]]:
    """{linear: (in features, out features) on one TP rank} of a decoder layer's fp8 GEMMs."""
    head_dim = model.hidden_size // model.num_heads
    q, kv, h = model.num_heads * head_dim, model.num_kv_heads * head_dim, model.hidden_size
    widths = {"self_attn.q_proj": (h, q // tp), "self_attn.k_proj": (h, kv // tp), "self_attn.v_proj": (h, kv // tp),
              "self_attn.o_proj": (q // tp, h)}
    if not model.num_experts:  # MoE expert stacks stay bf16
        ffn = model.ffn_hidden_size
        widths.update({"mlp.gate_proj": (h, ffn // tp), "mlp.up_proj": (h, ffn // tp), "mlp.down_proj": (ffn // tp, h)})
    return widths


def alignment_problem(recipe: str, model, tp: int, tokens: int) -> Optional[str]:
    """None if every fp8 GEMM of the layout tiles for `recipe`, else which ones do not and what would work.

    `tokens` is a GEMM's row count: micro_batch_size * seq_length / cp (sequence parallelism gathers
    the sequence before the column-parallel GEMMs).
    """
    width, rows = ALIGNMENT[recipe]
    bad = [f"{name} {k}->{n}" for name, (k, n) in local_gemm_widths(model, tp).items() if k % width or n % width]
    if tokens % rows:
        bad.append(f"{tokens} tokens per microbatch and rank (micro_batch_size*seq_length/cp)")
    if not bad:
        return None
    fits = [r for r, (w, t) in ALIGNMENT.items()
            if all(k % w == 0 and n % w == 0 for k, n in local_gemm_widths(model, tp).values()) and tokens % t == 0]
    return (f"{recipe} needs every fp8 GEMM width per tensor-parallel rank a multiple of {width} and the tokens "
            f"per microbatch a multiple of {rows} (its scaling blocks must tile each shard as they tile the "
            f"whole tensor); at tp={tp} these do not: {', '.join(bad)}. Widths per rank are hidden_size, "
            f"num_heads*head_dim/tp, num_kv_heads*head_dim/tp and ffn_hidden_size/tp (e.g. hidden_size=256, "
            f"num_heads=4, num_kv_heads=4, ffn_hidden_size=512 tile 128-blocks at tp=2)"
            + (f"; recipes that fit this layout: {', '.join(fits)}" if fits else ""))

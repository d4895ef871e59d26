"""The decoder's fp8 linear layers as Transformer Engine modules (CUDA, where transformer_engine imports).

Imported only on the TE path (engine/model/fp8/backend.py chooses it); nothing here runs on
CPU, and it has not run on a GPU in this project yet (see README, Precision). Written against
TE 2.x (transformer_engine/pytorch/module/linear.py, base.py, quantization.py); where TE's API
moved between versions both spellings are handled.

- Each converted layer becomes `TELinear`, a `transformer_engine.pytorch.Linear` (bias off,
  parallel_mode None: TE does no communication) whose `weight` is Apogee's own parameter: the same
  name, `tp_shard`, `main_grad`, so layout-invariant init, checkpoints, HF export and the parity
  tooling see no difference. Tensor and sequence parallelism stay Apogee's: a column-parallel
  layer enters the TP region (f, or the SP all-gather) before TE's GEMM and a row-parallel one
  leaves it (g, or the reduce-scatter) after, through parallel/collectives.py and its ledger.
  TE quantises the gathered input, so its amax is the whole tensor's, as TE's own amax reduction
  over the TP group gives for sequence-parallel inputs.
- fp8 runs under TE's autocast with the recipe (`te_recipe`) and, for delayed scaling, the amax
  reduction group the emulation uses (tp x cp x dp, one pipeline stage). TE reduces and updates at
  each autocast exit (forward tensors) and after each backward (gradients): per microbatch, where
  the emulation updates once per step; with one microbatch per step they coincide.
- `is_first_microbatch` (True on a step's first microbatch) makes TE cast each weight once per step.
- With plain data parallelism (parallel.zero=0) TE accumulates wgrad into the fp32 `main_grad`
  itself (fuse_wgrad_accumulation: overwrite on the first microbatch, add after) and marks
  `grad_added_to_main_grad`, which parallel/data_parallel.py's hook honours; under ZeRO, whose
  buffers are not per-parameter main_grads, TE returns wgrad through autograd as usual.
- TE's extra state (delayed scaling: each module's fp8_meta scale and amax history, forward and
  backward) is saved as tensors in the checkpoint (`state_tensors`), not as TE's pickled blob.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from engine.model.fp8.emulation import replace_module
from engine.model.fp8.recipes import RecipeSettings
from parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, enter_tp_region,
                                      leave_tp_region)


class MicrobatchFlag:
    """Whether the forward in progress is its step's first microbatch (TE's is_first_microbatch)."""

    def __init__(self):
        self.first: Optional[bool] = None


def te_recipe(settings: RecipeSettings):
    """The transformer_engine.common.recipe object of Apogee's recipe settings."""
    from transformer_engine.common import recipe as te_recipes

    fmt = te_recipes.Format.HYBRID if settings.fp8_format == "hybrid" else te_recipes.Format.E4M3
    if settings.recipe == "delayed":
        return te_recipes.DelayedScaling(margin=settings.margin, fp8_format=fmt,
                                         amax_history_len=settings.amax_history_len,
                                         amax_compute_algo=settings.amax_compute_algo, reduce_amax=True)
    if settings.recipe == "mxfp8":
        return te_recipes.MXFP8BlockScaling(fp8_format=fmt)
    if settings.recipe == "tensorwise":
        recipe = te_recipes.Float8CurrentScaling(fp8_format=fmt)
    else:  # blockwise: 1-D x and dy (1x128), 2-D W (128x128), TE's defaults
        recipe = te_recipes.Float8BlockScaling(fp8_format=fmt)
    # TE keeps the scale rule in class-level QParams (power-of-two by default for blockwise):
    # set it on the instance so the GPU runs the rule the emulation runs.
    if hasattr(te_recipes, "QParams"):
        qparams = te_recipes.QParams(power_2_scale=settings.power_2_scales, amax_epsilon=0.0)
        for role in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
            setattr(recipe, role, qparams)
    return recipe


def autocast(te, recipe, group):
    """TE's fp8 autocast (`te.autocast` from TE 2.8, `te.fp8_autocast` before)."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def _keep(weight: torch.Tensor) -> None:
    """TE's init_method: leave the weight alone (Apogee initialises it, layout-invariantly)."""


def _te_linear_class(te):
    class TELinear(te.Linear):
        """A TE Linear on Apogee's weight, inside Apogee's tensor-parallel region (see the module doc)."""

        def __init__(self, source: nn.Module, fuse_wgrad: bool, microbatch: MicrobatchFlag):
            weight = source.weight
            out_local, in_local = weight.shape
            super().__init__(in_local, out_local, bias=False, params_dtype=weight.dtype, device=weight.device,
                             parallel_mode=None, fuse_wgrad_accumulation=fuse_wgrad, init_method=_keep)
            del self.weight  # TE's own freshly allocated weight: replaced by Apogee's parameter
            self.weight = weight
            if fuse_wgrad:
                weight.grad_added_to_main_grad = False  # TE sets it when it wrote main_grad itself
            self.microbatch = microbatch
            self.apogee_mode = ("column" if isinstance(source, ColumnParallelLinear)
                                else "row" if isinstance(source, RowParallelLinear) else None)
            self.apogee_group = getattr(source, "group", None)
            self.apogee_sequence_parallel = getattr(source, "sequence_parallel", False)
            self.apogee_enter_region = getattr(source, "enter_region", False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.apogee_mode == "column" and self.apogee_enter_region:
                x = enter_tp_region(x, self.apogee_group, self.apogee_sequence_parallel)
            out = super().forward(x, is_first_microbatch=self.microbatch.first)
            if self.apogee_mode == "row":
                out = leave_tp_region(out, self.apogee_group, self.apogee_sequence_parallel)
            return out

    return TELinear


class TEPath:
    """The decoder's fp8 linears as TE modules: conversion, autocast, checkpointed state."""

    def __init__(self, settings: RecipeSettings, amax_group, fuse_wgrad: bool):
        import transformer_engine.pytorch as te

        self.te, self.settings = te, settings
        self.recipe = te_recipe(settings)
        self.amax_group = amax_group  # a torch.distributed group, or None alone
        self.fuse_wgrad = fuse_wgrad
        self.microbatch = MicrobatchFlag()
        self.modules: dict[str, nn.Module] = {}
        self._linear = _te_linear_class(te)

    def convert(self, model: nn.Module, names: list[str]) -> None:
        """Replace the modules `names` by TELinear layers on the same weights."""
        for name in names:
            module = self._linear(model.get_submodule(name), self.fuse_wgrad, self.microbatch)
            replace_module(model, name, module)
            self.modules[name] = module

    @contextmanager
    def forward(self, microbatch: int):
        """TE's autocast around one microbatch's forward; the first of a step casts the weights."""
        self.microbatch.first = microbatch == 0
        with autocast(self.te, self.recipe, self.amax_group):
            yield

    def _ensure_meta(self, module: nn.Module) -> None:
        # Before its first forward (a resume) a module has no fp8 tensors yet: create them as TE's
        # set_extra_state does, so the checkpoint loads into them and the first forward keeps them.
        if getattr(module, "fp8_meta_tensors_initialized", False):
            return
        meta = module.fp8_meta
        meta["recipe"], meta["num_gemms"] = self.recipe, 1
        meta["fp8_max_fwd"] = self.recipe.fp8_format.value.max_fwd
        meta["fp8_max_bwd"] = self.recipe.fp8_format.value.max_bwd
        module.init_fp8_meta_tensors(self.recipe)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Delayed scaling's fp8_meta tensors of every module, by checkpoint key (stateless recipes: none)."""
        if self.settings.recipe != "delayed":
            return {}
        views = {}
        for name, module in self.modules.items():
            self._ensure_meta(module)
            for direction in ("fwd", "bwd"):
                meta = module.fp8_meta[f"scaling_{direction}"]
                views[f"fp8/te/{name}/{direction}_scale"] = meta.scale
                views[f"fp8/te/{name}/{direction}_amax_history"] = meta.amax_history
        return views

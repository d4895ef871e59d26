"""Fp8Training: everything the trainer asks of fp8, on either path.

    fp8 = Fp8Training(cfg, ctx, ledger)    # picks Transformer Engine or the emulation, says which
    fp8.convert(chunks)                    # the decoder GEMMs of this rank's chunks run in fp8
    with fp8.forward(j): model(...)        # microbatch j's forward (TE: autocast, is_first_microbatch)
    fp8.step_done()                        # after the optimizer step: delayed scaling's amax reduction
    fp8.state_tensors()                    # the recipe's state, by checkpoint key (layout-free)

The amax reduction group is tp x cp x dp: the ranks of one pipeline stage, which hold the same
layers and see other shards (TP) or other tokens (CP, DP) of the same tensors. Delayed scaling
reduces over it once per step (one all-reduce of this rank's row of amaxes, booked as 'fp8_amax');
the current-scaling recipes need no reduction (each tensor's amax is taken where the tensor is
whole: a sequence-parallel input after its all-gather), and the block recipes' scales are local
to their blocks. The state is keyed by layer name, identical on every rank of the group, so a
checkpoint of one layout resumes in another.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from engine.model.fp8.backend import choose_backend, describe
from engine.model.fp8.emulation import convert_to_emulation, fp8_layer_names
from engine.model.fp8.recipes import Fp8Recipe, RecipeSettings
from parallel.collectives import CommLedger, all_reduce

AMAX_GROUP = "tp-cp-dp"
"""The ParallelContext group kind over which delayed scaling's amaxes are reduced."""


class Fp8Training:
    """This rank's fp8 recipe, on the path chosen for its device (see the module doc)."""

    def __init__(self, cfg, ctx, ledger: CommLedger):
        self.settings = RecipeSettings.from_config(cfg.precision)
        self.first_bf16, self.last_bf16 = cfg.precision.fp8_first_layers_bf16, cfg.precision.fp8_last_layers_bf16
        self.num_layers = cfg.model.num_layers
        self.backend, self.why = choose_backend(cfg.precision.fp8_backend, ctx.device)
        self.amax_group = ctx.comm_group(AMAX_GROUP, ledger)
        self.recipe = Fp8Recipe(self.settings)
        self.te_path = None
        if self.backend == "te":
            from engine.model.fp8.te import TEPath

            # TE writes wgrad into main_grad where there is one per parameter (parallel.zero=0).
            self.te_path = TEPath(self.settings, ctx.group(AMAX_GROUP), fuse_wgrad=cfg.parallel.zero == 0)
        self.converted: list[str] = []

    @property
    def log_line(self) -> str:
        """Which path runs and why."""
        return describe(self.settings.recipe, self.settings.fp8_format, self.backend, self.why)

    def convert(self, chunks: list[nn.Module]) -> list[str]:
        """Route the fp8 GEMMs of every chunk through the chosen path; returns their module names."""
        device = None
        for chunk in chunks:
            names = fp8_layer_names(chunk, self.num_layers, self.first_bf16, self.last_bf16)
            if self.te_path is not None:
                self.te_path.convert(chunk, names)
            else:
                convert_to_emulation(chunk, names, self.recipe)
            self.converted += names
            device = device or next(chunk.parameters()).device
        self.recipe.allocate(device or torch.device("cpu"))
        return list(self.converted)

    def forward(self, microbatch: int):
        """The context of microbatch `microbatch`'s forward (the emulation needs none)."""
        return self.te_path.forward(microbatch) if self.te_path is not None else nullcontext()

    def step_done(self) -> None:
        """After the optimizer step: the emulated delayed recipe reduces its amaxes (max, one
        all-reduce over tp x cp x dp) and sets the next step's scales (TE does this itself)."""
        if self.te_path is None:
            self.recipe.update(self._reduce_amaxes)

    def _reduce_amaxes(self, amaxes: torch.Tensor) -> None:
        all_reduce(amaxes, self.amax_group, op=torch.distributed.ReduceOp.MAX, purpose="fp8_amax")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The recipe's state as live tensors by checkpoint key (loaded in place); empty when stateless."""
        return self.te_path.state_tensors() if self.te_path is not None else self.recipe.state_tensors()

    def metadata(self) -> dict:
        """What a checkpoint's manifest records about fp8."""
        return {"recipe": self.settings.recipe, "format": self.settings.fp8_format, "backend": self.backend}

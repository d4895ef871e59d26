"""Building a model without memory and materialising only this rank's shard, on its device.

torchtitan's meta-device init: the decoder is constructed on the meta device (shapes, no storage),
made parallel there (tensor-parallel layers, expert shards and LoRA adapters are meta too, so no
full-size tensor is ever allocated), cast to the run's dtype, and only then given storage on the
rank's device with `to_empty`. `init_parameters` (engine/model/decoder.py) then fills each
parameter with its slice of the layout-invariant initial value, drawn tile by tile
(parallel/tiled_random.py), and the tensors that are not parameters (RoPE's inverse frequencies,
the MoE balance-loss sums) are recomputed, since a meta tensor holds no values to move.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.decoder import LlamaModel, init_parameters, rope_inv_freq
from engine.model.moe import MoE


def meta_model(cfg: ModelConfig, layer_ids: Optional[Sequence[int]] = None, pre_process: bool = True,
               post_process: bool = True) -> LlamaModel:
    """The decoder (or a pipeline stage's slice of it) on the meta device: shapes only, no storage."""
    with torch.device("meta"):
        return LlamaModel(cfg, layer_ids, pre_process=pre_process, post_process=post_process)


def reset_non_parameters(model: nn.Module) -> None:
    """Recompute the tensors a model holds besides its parameters (never drawn, never loaded)."""
    for module in model.modules():
        if isinstance(module, LlamaModel):
            module.inv_freq = rope_inv_freq(module.cfg.head_dim, module.cfg.rope_base, module.cfg.rope_scaling)
        elif isinstance(module, MoE):
            module.aux_loss_sum = torch.zeros(())


@torch.no_grad()
def materialize(model: LlamaModel, seed: int, device: torch.device | str, dtype: torch.dtype) -> LlamaModel:
    """Give a meta `model` storage on `device` in `dtype` and its layout-invariant initial values; returns it.

    Each parameter is allocated at its local (shard) size only. `to_empty` makes new Parameter
    objects, so their markers (tp_shard, ep_shard, tp_partial_grad, ...) are carried over.
    """
    markers = {name: dict(param.__dict__) for name, param in model.named_parameters()}
    model.to(dtype=dtype)  # on meta: no storage yet, so the cast costs nothing
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        param.__dict__.update(markers[name])
    init_parameters(model, seed)
    reset_non_parameters(model)
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise RuntimeError(f"materialize: parameters still on the meta device: {', '.join(left[:5])}")
    return model

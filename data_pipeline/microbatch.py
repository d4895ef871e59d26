"""The one type every data source hands the trainer for a (step, microbatch, data-parallel rank)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Microbatch(NamedTuple):
    """Token rows and, where only some targets train (SFT, DPO, RL), which ones."""

    tokens: torch.Tensor
    """LongTensor [rows, seq_length + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    loss_mask: Optional[torch.Tensor] = None
    """[rows, seq_length]: 1 where target t trains, 0 where it is context or padding; None: all train."""

"""The one type every data source hands the trainer for a (step, microbatch, data-parallel rank)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Microbatch(NamedTuple):
    """Token rows and, where only some targets train (SFT, DPO, RL), which ones; where a row holds
    several documents (data.document_mask, packing), which document each input token is in."""

    tokens: torch.Tensor
    """LongTensor [rows, seq_length + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    loss_mask: Optional[torch.Tensor] = None
    """[rows, seq_length]: 1 where target t trains, 0 where it is context or padding; None: all train."""
    document_ids: Optional[torch.Tensor] = None
    """LongTensor [rows, seq_length]: the document of input t (0, 1, ... in order; -1 padding): an input
    attends only to earlier inputs of its document. None: one causal sequence per row."""
    positions: Optional[torch.Tensor] = None
    """LongTensor [rows, seq_length]: RoPE position of input t (restarting per document). None: 0..s-1."""

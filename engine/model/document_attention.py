"""Causal attention within documents: a row of several documents, no token seeing another document.

The document mask is block-diagonal (one causal block per document), so instead of a dense
s x s mask the kernel runs the fused causal attention (SDPA: flash on CPU and CUDA) on each
document's own q/k/v slice, the varlen form of FlashAttention: the masked off-diagonal blocks
are never computed, and the work is sum(len_i^2) instead of s^2. Each slice is exactly the
causal attention that document would get alone in a row, which is what makes a packed example's
loss equal its unpacked loss.

`DocumentSegments` turns the microbatch's document ids [b, s] into per-row (start, end) spans
once per forward (one device->host copy), shared by every layer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


class DocumentSegments:
    """The document spans of each row: spans[b] = [(start, end), ...] covering 0..s in order."""

    def __init__(self, document_ids: Tensor):
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
        b, s = document_ids.shape
        change = (document_ids[:, 1:] != document_ids[:, :-1]).nonzero().tolist()
        starts: list[list[int]] = [[0] for _ in range(b)]
        for row, t in change:
            starts[row].append(t + 1)
        self.seq_length = s
        self.spans = [list(zip(row, row[1:] + [s])) for row in starts]

    def work_fraction(self) -> float:
        """Query-key pairs computed (sum of len^2 / 2 over documents) over the full causal s^2 / 2."""
        full = len(self.spans) * self.seq_length * (self.seq_length + 1) / 2
        return sum(n * (n + 1) / 2 for row in self.spans for n in (e - a for a, e in row)) / full


def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def document_attention(q: Tensor, k: Tensor, v: Tensor, segments: DocumentSegments,
                       causal: Callable[[Tensor, Tensor, Tensor], Tensor] = _causal) -> Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]: each document's causal attention over itself."""
    if q.shape[2] != segments.seq_length:
        raise ValueError(f"document attention: {q.shape[2]} query positions, document ids for {segments.seq_length}")
    rows = []
    for row, spans in enumerate(segments.spans):
        if len(spans) == 1:
            rows.append(causal(q[row:row + 1], k[row:row + 1], v[row:row + 1]))
            continue
        rows.append(torch.cat([causal(q[row:row + 1, :, a:e], k[row:row + 1, :, a:e], v[row:row + 1, :, a:e])
                               for a, e in spans], dim=2))
    return torch.cat(rows, dim=0)

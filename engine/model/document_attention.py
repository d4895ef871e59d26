"""Causal attention within documents: a row of several documents, no token seeing another document.

The document mask is block-diagonal (one causal block per document), so instead of a dense
s x s mask the kernel runs fused causal attention on each document's own q/k/v slice, the
varlen form of FlashAttention: the masked off-diagonal blocks are never computed, and the work
is sum(len_i^2) instead of s^2. Documents of similar length are batched
into one fused SDPA call (flash on CPU and CUDA), padded to a common bucket length, so a row of
many short documents costs a few kernel calls, not one per document. On CUDA, varlen flash
attention or FlexAttention would drop the bucket padding too (not built: no GPU here to test it). Each slice is exactly the
causal attention that document would get alone in a row, which is what makes a packed example's
loss equal its unpacked loss.

`DocumentSegments` turns the microbatch's document ids [b, s] into per-row (start, end) spans
once per forward (one device->host copy), shared by every layer; it also carries the ids and a
cache for cores that mask otherwise (context parallelism's ring attention builds its block masks
from the full sequence's ids, parallel/context_parallel.py).
"""
from __future__ import annotations

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
        self.ids, self.seq_length = document_ids, s
        self.spans = [list(zip(row, row[1:] + [s])) for row in starts]
        self.buckets = None  # the gather plan, built on first use on the attention's device
        self.cache: dict = {}  # other attention cores' per-forward plans (ring attention's block masks)

    def work_fraction(self) -> float:
        """Query-key pairs computed (sum of len^2 / 2 over documents) over the full causal s^2 / 2."""
        full = len(self.spans) * self.seq_length * (self.seq_length + 1) / 2
        return sum(n * (n + 1) / 2 for row in self.spans for n in (e - a for a, e in row)) / full


def bucket_length(n: int) -> int:
    """The padded length documents of n tokens are batched at: the next of 16, 24, 32, 48, 64, 96, ...
    (powers of two and 1.5 x powers of two: at most 1/3 of a bucket's tokens are padding)."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size // 3 * 4
    return size


def _buckets(segments: DocumentSegments, device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per bucket: (gather index [n, L] into the b*s tokens, flat positions of the real tokens,
    their places in the gathered [n*L] order). Padding repeats a document's last token: it comes after
    every real token of its document, so causal attention never lets a real query see it."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for row, spans in enumerate(segments.spans):
        for a, e in spans:
            groups.setdefault(bucket_length(e - a), []).append((row * segments.seq_length + a, e - a))
    out = []
    for size, docs in sorted(groups.items()):
        offsets = torch.arange(size)
        starts = torch.tensor([a for a, _ in docs])[:, None]
        lengths = torch.tensor([n for _, n in docs])[:, None]
        index = starts + torch.minimum(offsets, lengths - 1)
        real = (offsets < lengths).reshape(-1)
        out.append((index.to(device), index.reshape(-1)[real].to(device), real.nonzero().squeeze(1).to(device)))
    return out


def document_attention(q: Tensor, k: Tensor, v: Tensor, segments: DocumentSegments) -> Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]: each document's causal attention over itself.

    Documents are batched by padded length (`bucket_length`): one fused causal SDPA call per bucket
    on the gathered [documents, heads, L, d] tensors, scattered back; autograd's backward of the
    gather is one index_add per bucket (slicing per document would allocate a full-size gradient
    per slice)."""
    b, hq, s, d = q.shape
    if s != segments.seq_length:
        raise ValueError(f"document attention: {s} query positions, document ids for {segments.seq_length}")
    if segments.buckets is None or segments.buckets[0][0].device != q.device:
        segments.buckets = _buckets(segments, q.device)
    tokens = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]  # [b*s, heads, d]
    out = q.new_empty(b * s, hq, d)
    for index, real_tokens, real_places in segments.buckets:
        qb, kb, vb = (t[index].transpose(1, 2) for t in tokens)  # [n, heads, L, d]
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=kb.shape[1] != hq)
        out = out.index_copy(0, real_tokens, ob.transpose(1, 2).reshape(-1, hq, d)[real_places])
    return out.view(b, s, hq, d).transpose(1, 2)

"""Document structure inside a sample: which document each token belongs to, and packing.

A sample is seq_length + 1 tokens: inputs are tokens[:-1], targets tokens[1:]. When it holds
several documents (a pre-training window of the concatenated stream, or packed SFT/DPO
examples), `document_layout` gives, per *input* position t:
- document_ids[t]: the document of input token t (consecutive ids from 0; -1 for the padding
  after the last packed example), which the attention uses to keep tokens inside their document;
- positions[t]: t minus the start of its document (RoPE positions restarting per document);
- boundary_mask[t]: 0 where target t+1 is the first token of the next document (it must not be
  predicted from the previous document), 1 otherwise. A document's last token (its EOD) is a
  target of its own document, so it stays trained.

`segments_from_eod` finds the documents of a stream that has no .idx index (each ends with an
EOD token); `best_fit_decreasing` packs examples into rows as TRL's `packing_strategy="bfd"` does.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

from data_pipeline import DataError

PADDING_DOCUMENT = -1
"""document_ids value of the padding after the last packed example (never trained)."""


def document_layout(segment_lengths: Sequence[int], seq_length: int,
                    padded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(document_ids [s], positions [s], boundary_mask [s]) of a sample made of consecutive documents.

    segment_lengths: the tokens of each document in the sample, in order, summing to seq_length + 1
    (a window of the stream) or, with `padded`, to at most that (the rest is padding, its own
    document PADDING_DOCUMENT, positions counting on from 0).
    """
    lengths = [int(n) for n in segment_lengths]
    total = sum(lengths)
    if any(n <= 0 for n in lengths) or total > seq_length + 1 or (not padded and total != seq_length + 1):
        raise DataError(f"document lengths {lengths} (sum {total}): expected positive lengths summing to "
                        f"{'at most ' if padded else ''}seq_length + 1 = {seq_length + 1}")
    n = seq_length + 1
    ids = torch.full((n,), PADDING_DOCUMENT, dtype=torch.int64)
    positions = torch.empty(n, dtype=torch.int64)
    start = 0
    for doc, length in enumerate(lengths):
        ids[start:start + length] = doc
        positions[start:start + length] = torch.arange(length)
        start += length
    positions[start:] = torch.arange(n - start)
    # Target t+1 trains only when it continues input t's document.
    boundary = (ids[1:] == ids[:-1]) & (ids[1:] != PADDING_DOCUMENT)
    return ids[:-1].clone(), positions[:-1].clone(), boundary.float()


def segments_from_eod(tokens: Sequence[int], eod_id: int) -> list[int]:
    """Lengths of the documents of a token window where each document ends with `eod_id`
    (the last may be cut by the window's end, the first may have started before it)."""
    lengths, start = [], 0
    for i, token in enumerate(tokens):
        if int(token) == eod_id:
            lengths.append(i + 1 - start)
            start = i + 1
    if start < len(tokens):
        lengths.append(len(tokens) - start)
    return lengths


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into bins of `capacity` tokens by best-fit decreasing.

    Items are taken longest first (ties in index order, so the result depends only on the list);
    each goes to the open bin whose free space is the smallest that still holds it, or a new bin.
    Bins come out in creation order, each listing its items in placement order.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n <= 0]
    if too_long:
        i = too_long[0]
        raise DataError(f"packing: item {i} has {lengths[i]} tokens; each must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted: bisect finds the best fit
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            remaining, index = capacity - lengths[i], len(bins) - 1
        else:
            remaining, index = free.pop(slot)
            bins[index].append(i)
            remaining -= lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, index))
    return bins

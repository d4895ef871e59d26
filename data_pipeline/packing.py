"""Packed SFT and DPO samples: several examples per row by best-fit decreasing, each attending
only to itself (document ids) with its own RoPE positions.

A packed sample is one row of seq_length + 1 tokens holding whole examples back to back (each
truncated to seq_length + 1 tokens as unpacked samples are), then padding. Its microbatch carries
document_ids and positions (data_pipeline/documents.py), and a loss mask that trains what the
unpacked sample would: the example's trained targets, never a target that starts the next example,
never padding. So each example's loss sum is the one it has unpacked, up to rounding.

Sample p of the run is row perm'_e[p % rows] of epoch e = p // rows: the epoch's examples in
the unpacked order (perm_e, data_pipeline/sft.py's draw from (seed, e)) packed by best-fit
decreasing, the rows shuffled by a second draw. Packing is deterministic on the lengths alone,
so every epoch has the same number of rows and the position -> row map stays a pure function:
`train.global_batch_size` counts packed rows, and resume and skip_steps work as for any data
(data_pipeline.loader.sample_position).

DPO packs pairs: both sides of a pair go in one row, chosen then rejected (documents 2k and 2k+1
for the row's k-th pair), so a pair's two log-probabilities come from one forward; a pair longer
than a row in total is left out, with a note.
"""
from __future__ import annotations

from typing import Optional

import torch

from data_pipeline import DataError
from data_pipeline.documents import best_fit_decreasing, document_layout
from data_pipeline.loader import sample_position
from data_pipeline.microbatch import Microbatch


def _permutation(n: int, seed: int, epoch: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch + salt * 7_919) % 2**63)
    return torch.randperm(n, generator=gen)


class PackedRows:
    """Rows of whole items (lists of (tokens, trained) pieces placed together), by epoch and position."""

    def __init__(self, items: list, seq_length: int, seed: int):
        self.items, self.seq_length, self.seed = items, seq_length, seed
        self.capacity = seq_length + 1
        self.lengths = [sum(len(tokens) for tokens, _ in item) for item in items]
        self._epochs: dict[int, tuple[list, torch.Tensor]] = {}
        self.rows_per_epoch = len(self._epoch(0)[0])

    def _epoch(self, epoch: int) -> tuple[list, torch.Tensor]:
        if epoch not in self._epochs:
            order = _permutation(len(self.items), self.seed, epoch).tolist()  # the unpacked sample order
            bins = best_fit_decreasing([self.lengths[i] for i in order], self.capacity)
            rows = [[order[i] for i in b] for b in bins]
            self._epochs[epoch] = (rows, _permutation(len(rows), self.seed, epoch, salt=1))
        return self._epochs[epoch]

    def row_items(self, position: int) -> list[int]:
        """Indices of the items in packed row `position` of the run, in their order in the row."""
        epoch, index = divmod(position, self.rows_per_epoch)
        rows, order = self._epoch(epoch)
        return rows[int(order[index])]

    def row(self, position: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [s+1], loss mask [s], document ids [s], positions [s]) of packed row `position`."""
        tokens, trained, lengths = [], [], []
        for item in self.row_items(position):
            for piece_tokens, piece_trained in self.items[item]:
                tokens += piece_tokens
                trained += piece_trained
                lengths.append(len(piece_tokens))
        pad = self.capacity - len(tokens)
        ids, positions, boundary = document_layout(lengths, self.seq_length, padded=True)
        mask = torch.tensor(trained[1:] + [0] * pad, dtype=torch.float32) * boundary
        return torch.tensor(tokens + [pad_id] * pad, dtype=torch.int64), mask, ids, positions

    def padding_fraction(self) -> float:
        """Fraction of an epoch's row tokens that are padding."""
        return 1.0 - sum(self.lengths) / (self.rows_per_epoch * self.capacity)


class _PackedData:
    """Microbatches of packed rows addressed by (step, microbatch, dp rank)."""

    def __init__(self, rows: PackedRows, global_batch_size: int, micro_batch_size: int, pad_id: int):
        self.rows, self.pad_id = rows, pad_id
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """(tokens [mbs, s+1], loss mask, document ids, positions [mbs, s]) of this (step, microbatch, dp rank)."""
        first = sample_position(step, microbatch, dp_rank, dp_size, self.global_batch_size,
                                self.micro_batch_size, skip_steps)
        parts = zip(*(self.rows.row(first + i, self.pad_id) for i in range(self.micro_batch_size)))
        tokens, mask, ids, positions = (torch.stack(p) for p in parts)
        return Microbatch(tokens, mask, ids, positions)


def _truncated(example: tuple[list, list], keep: int) -> tuple[list, list]:
    return list(example[0][:keep]), list(example[1][:keep])


class PackedSFTData(_PackedData):
    """SFT examples (data_pipeline/sft.py's (tokens, trained)) packed into rows; see the module doc."""

    def __init__(self, examples: list, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, pad_id: int):
        items = [[_truncated(example, seq_length + 1)] for example in examples]
        super().__init__(PackedRows(items, seq_length, seed), global_batch_size, micro_batch_size, pad_id)


class PackedPreferenceData(_PackedData):
    """Preference pairs packed into rows, each pair's chosen then rejected side (documents 2k, 2k+1)."""

    def __init__(self, chosen: list, rejected: list, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, pad_id: int, notes: Optional[list] = None):
        keep = seq_length + 1
        pairs = [[_truncated(c, keep), _truncated(r, keep)] for c, r in zip(chosen, rejected)]
        fitting = [pair for pair in pairs if len(pair[0][0]) + len(pair[1][0]) <= keep]
        self.notes = list(notes or [])
        if len(fitting) < len(pairs):
            self.notes.append(f"dpo.packing: left out {len(pairs) - len(fitting)} of {len(pairs)} pairs whose chosen "
                              f"and rejected sequences together exceed model.seq_length + 1 = {keep} tokens "
                              f"(a pair's sides share a row)")
        if not fitting:
            raise DataError(f"dpo.packing: no pair fits one row of model.seq_length + 1 = {keep} tokens with both "
                            f"sides; raise model.seq_length or set dpo.packing=false")
        super().__init__(PackedRows(fitting, seq_length, seed), global_batch_size, micro_batch_size, pad_id)

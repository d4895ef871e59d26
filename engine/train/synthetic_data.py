"""Synthetic training data: samples that are a pure function of (seed, position), for parity runs
and benchmarks that must not depend on a corpus or a tokenizer."""
from __future__ import annotations

import torch

from data_pipeline.documents import document_layout, segments_from_eod
from data_pipeline.microbatch import Microbatch
from parallel.random import generator


class SyntheticData:
    """A deterministic stand-in for TrainingData: sample p of the run depends only on (seed, p).

    Global position p = step * GBS + j * (mbs * dp) + r * mbs + i for sample i of microbatch j on
    DP rank r, so every DP layout trains on the same global batch. Each token continues an
    arithmetic progression mod vocab or is one of 8 frequent tokens, so there is something to
    learn and the loss falls within ten steps.

    document_mask / reset_position_ids: a stream without an index, so documents end at each
    EOD_TOKEN (data_pipeline/documents.py's segments_from_eod), as data.* asks of real data.
    """

    EOD_TOKEN = 0
    """The end-of-document token of the synthetic stream (one of the frequent ones: short documents)."""

    def __init__(self, seed: int, vocab_size: int, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 masked: bool = False, document_mask: bool = False, reset_position_ids: bool = False):
        self.seed, self.vocab_size, self.seq_length = seed, vocab_size, seq_length
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.masked = masked
        self.document_mask, self.reset_position_ids = document_mask, reset_position_ids

    @classmethod
    def for_config(cls, cfg, masked: bool = False) -> "SyntheticData":
        """The data of a config's model and batch sizes (masked: SFT-style microbatches), with the
        document masking and positions data.* asks for."""
        return cls(cfg.seed, cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size,
                   cfg.train.global_batch_size, masked, cfg.data.document_mask, cfg.data.reset_position_ids)

    def loss_mask(self, position: int) -> torch.Tensor:
        """SFT-style mask [seq] of sample `position`: a prompt of 0..seq/2 untrained targets, then trained ones."""
        prompt = int(torch.randint(0, self.seq_length // 2 + 1, (1,), generator=generator(self.seed, "mask", position)))
        return (torch.arange(self.seq_length) >= prompt).float()

    def sample(self, position: int) -> torch.Tensor:
        """Tokens [seq + 1] of global sample `position`."""
        gen = generator(self.seed, "parity-data", position)
        n = self.seq_length + 1
        start = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
        stride = int(torch.randint(1, 4, (1,), generator=gen))
        progression = (start + stride * torch.arange(n)) % self.vocab_size
        frequent = torch.randint(0, 8, (n,), generator=gen)  # a skewed unigram: learnt in a few steps
        return progression.where(torch.rand(n, generator=gen) < 0.5, frequent)

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """Tokens [mbs, seq + 1] (and a loss mask when masked) of microbatch `microbatch` of DP rank
        `dp_rank` at optimizer step `step`."""
        data_step = step
        for skipped in sorted(skip_steps):  # skipped batches are never trained on: shift past them
            if skipped <= data_step:
                data_step += 1
        mbs = self.micro_batch_size
        first = data_step * self.global_batch_size + microbatch * mbs * dp_size + dp_rank * mbs
        tokens = torch.stack([self.sample(first + i) for i in range(mbs)])
        mask = torch.stack([self.loss_mask(first + i) for i in range(mbs)]) if self.masked else None
        if not (self.document_mask or self.reset_position_ids):
            return Microbatch(tokens, mask)
        ids, positions, boundary = (torch.stack(parts) for parts in zip(
            *(document_layout(segments_from_eod(row.tolist(), self.EOD_TOKEN), self.seq_length) for row in tokens)))
        if self.document_mask:
            mask = boundary if mask is None else mask * boundary
        return Microbatch(tokens, mask, ids if self.document_mask else None,
                          positions if self.reset_position_ids else None)

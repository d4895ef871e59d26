"""Sampling from the engine's (parallel) model with a KV cache: `apogee generate`, `apogee eval`'s
tasks and GRPO's rollouts all go through `Generator`.

A call generates `len(generators)` completions of one prompt in lockstep: the prompt runs once
through the model, filling one KVCache per layer (engine/model/kv_cache.py), then each new token
is one position through the model, attending to the cache. Rows of one prompt share its length,
so nothing is padded and a row's tokens depend only on (weights, prompt, its generator): the
same in every data-parallel layout and whichever prompts share a batch. At tp > 1 the
vocab-sharded logits of the last position are all-gathered over the TP group (booked as
`generate_logits`), so every TP rank samples the same token.

Decoding: greedy at temperature 0 (argmax), else softmax(logits / T), restricted to the smallest
set of tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019; the
rule of transformers' TopPLogitsWarper), drawn with the row's torch.Generator. A row stops at the
end-of-document token (kept as its last token), at a stop string in its decoded text, or after
max_new_tokens. `use_cache=False` re-runs the whole sequence for each token (what GRPO did
before; needed under sequence parallelism, whose shards cannot hold one new token), padded to a
multiple of `pad_multiple`; it gives the same tokens up to float rounding.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from engine.model.kv_cache import ModelCache
from parallel.collectives import Group, all_gather_along

FINISH_REASONS = ("eod", "stop", "length")
"""Why a completion ended: the end-of-document token, a stop string, or max_new_tokens."""


class Completion(NamedTuple):
    """One generated completion: its token ids (the EOD token last when it ended there) and why it ended."""

    ids: list
    finish: str


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits [n, V] with every token outside the top-p nucleus set to -inf (at least one kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1.0 - top_p
    drop[:, -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, generators: list, top_p: float = 1.0) -> torch.Tensor:
    """One token per row of full-vocabulary logits [n, V], row i drawn with generators[i] from
    softmax(logits / temperature) within the top-p nucleus; greedy (argmax) at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(logits.float().cpu() / temperature, top_p), dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=gen) for p, gen in zip(probs, generators)])


def completion_text(completion: Completion, decode: Callable[[list], str], eod_id: int,
                    stop: Sequence[str] = ()) -> str:
    """The text of a completion: decoded without its EOD token and cut before the first stop string."""
    ids = completion.ids[:-1] if completion.finish == "eod" else completion.ids
    text = decode(ids)
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


class Generator:
    """Completions of prompts from `model` (this rank's chunk of a pp=1, cp=1 model; vocab-sharded
    over `tp` when given); see the module doc."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, eod_id: int, tp: Optional[Group] = None,
                 use_cache: bool = True, pad_multiple: int = 1, pad_id: int = 0,
                 device: Optional[torch.device] = None):
        self.model, self.vocab_size, self.eod_id = model, vocab_size, eod_id
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.use_cache, self.pad_multiple, self.pad_id = use_cache, pad_multiple, pad_id
        self.device = device if device is not None else next(model.parameters()).device

    def _last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits [rows, vocab_size] of the last position of logits [rows, s, V/t]."""
        last = logits[:, -1]
        if self.tp is not None:
            last = all_gather_along(last.contiguous(), -1, self.tp, purpose="generate_logits")
        return last[:, :self.vocab_size].float()

    def _uncached_logits(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Logits of position length - 1, re-running tokens[:, :length] (padded to pad_multiple)."""
        padded = -(-length // self.pad_multiple) * self.pad_multiple
        inputs = tokens[:, :padded]
        if padded > tokens.shape[1]:
            extra = torch.full((tokens.shape[0], padded - tokens.shape[1]), self.pad_id, dtype=tokens.dtype)
            inputs = torch.cat([inputs, extra], dim=1)
        # Causal attention: positions past `length` (padding) never reach position length - 1.
        logits = self.model(inputs.to(self.device), positions=torch.arange(padded, device=self.device))
        return self._last_logits(logits[:, :length])

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], generators: list, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), decode: Optional[Callable[[list], str]] = None
                 ) -> list[Completion]:
        """len(generators) completions of `prompt` (token ids), row i sampled with generators[i]."""
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if stop and decode is None:
            raise ValueError("stop strings need a decode function")
        rows, start = len(generators), len(prompt)
        tokens = torch.tensor(list(prompt), dtype=torch.int64).repeat(rows, 1)
        tokens = torch.cat([tokens, torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.int64)], dim=1)
        cache = ModelCache(start + max_new_tokens) if self.use_cache else None
        if cache is not None:
            logits = self._last_logits(self.model(tokens[:, :start].to(self.device),
                                                  positions=torch.arange(start, device=self.device), cache=cache))
        else:
            logits = self._uncached_logits(tokens, start)
        finish: list[Optional[str]] = [None] * rows
        lengths = [max_new_tokens] * rows  # completion tokens of each row once it has finished
        for t in range(max_new_tokens):
            chosen = sample_tokens(logits, temperature, generators, top_p).cpu()
            tokens[:, start + t] = chosen
            for row in range(rows):
                if finish[row] is None:
                    if int(chosen[row]) == self.eod_id:
                        finish[row] = "eod"
                    elif stop and any(s in decode(tokens[row, start:start + t + 1].tolist()) for s in stop):
                        finish[row] = "stop"
                    lengths[row] = t + 1
            if all(f is not None for f in finish) or t + 1 == max_new_tokens:
                break
            position = start + t
            if cache is not None:
                logits = self._last_logits(self.model(chosen[:, None].to(self.device),
                                                      positions=torch.tensor([position], device=self.device),
                                                      cache=cache))
            else:
                logits = self._uncached_logits(tokens, position + 1)
        return [Completion(tokens[row, start:start + lengths[row]].tolist(), finish[row] or "length")
                for row in range(rows)]

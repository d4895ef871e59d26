"""Prompts with verifiable answers for GRPO / RLVR (the rewards that verify completions: engine/rewards.py).

Each line of a JSONL file is one prompt: {"prompt": "...", "answer": "..."}, the prompt text or a
list of chat messages. Text is tokenised after the tokenizer's BOS (where it adds one); messages
are rendered with the chat template's generation prompt (data_pipeline/sft.py: encode_prompt),
as TRL's GRPO does. The answer is only ever compared with decoded
completions by a reward function. Prompts are addressed like SFT examples (data_pipeline/sft.py):
sample p of the run is a prompt drawn from a per-epoch permutation of (seed, epoch), and
(step, microbatch, dp rank) maps to global positions through data_pipeline.loader.sample_position,
so every data-parallel layout reads the same prompts at the same positions.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_pipeline import DataError
from data_pipeline.jsonl import jsonl_records
from data_pipeline.loader import sample_position
from data_pipeline.sft import SFTData, encode_prompt

KEYS = ("prompt", "answer")
"""Text fields of a prompt line."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a step: its global sample position, its token ids and its answer."""

    position: int
    tokens: tuple
    answer: str


def read_prompts(paths, tokenizer, max_prompt_tokens: int, key: str = "inputs",
                 limit: str = "max_prompt_tokens") -> list[tuple[tuple, str]]:
    """(token ids, answer) of every prompt in the JSONL files `paths`; errors name file and line.

    A prompt must be 1..max_prompt_tokens tokens (the caller names it in `limit`), so
    that it and its longest completion fit in a training sample.
    """
    prompts = []
    for where, record in jsonl_records(paths, key, "{prompt, answer} lines"):
        if not (isinstance(record.get("prompt"), (str, list)) and isinstance(record.get("answer"), str)):
            raise DataError(f"{where}: expected text fields {list(KEYS)}; found {sorted(record)}")
        tokens = tuple(encode_prompt(record["prompt"], tokenizer, where))
        if not 1 <= len(tokens) <= max_prompt_tokens:
            raise DataError(f"{where}: the prompt is {len(tokens)} tokens; 1 to {max_prompt_tokens} "
                            f"({limit}) fit")
        prompts.append((tokens, record["answer"]))
    if not prompts:
        raise DataError(f"{key}={[str(p) for p in paths]}: no prompts")
    return prompts


class PromptData(SFTData):
    """Prompts addressed by (step, microbatch, dp rank): a microbatch is a list of mbs `Prompt`s.

    The order (a fresh permutation per epoch) is SFTData's, so prompt p of the run is the same
    in every layout and on resume.
    """

    def __init__(self, prompts: list, seed: int, global_batch_size: int, micro_batch_size: int):
        super().__init__(prompts, seq_length=0, seed=seed, global_batch_size=global_batch_size,
                         micro_batch_size=micro_batch_size, pad_id=0)

    def prompt(self, position: int) -> Prompt:
        """The prompt at global sample position `position`."""
        tokens, answer = self._example(position)
        return Prompt(position, tokens, answer)

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> list[Prompt]:
        """The mbs prompts of this (step, microbatch, dp rank)."""
        first = sample_position(step, microbatch, dp_rank, dp_size, self.global_batch_size,
                                self.micro_batch_size, skip_steps)
        return [self.prompt(first + i) for i in range(self.micro_batch_size)]

"""Preference pairs for DPO: {prompt, chosen, rejected} JSONL lines -> paired SFT-style samples.

A pair is two examples sharing the prompt: prompt + chosen and prompt + rejected, each trained on
its response only (data_pipeline/sft.py's rules: BOS where the tokenizer adds one, the response
ending with the declared EOS). TRL's conversational form, {"prompt": [messages], "chosen":
[messages], "rejected": [messages]}, is rendered with the tokenizer's chat template (or the plain
format without one) and trains the chosen / rejected assistant turns only. Both sides are addressed like SFT
samples with the same seed, so sample p of the run is the same pair on both sides; a microbatch
stacks the chosen sequences of its mbs pairs, then their rejected ones.
"""
from __future__ import annotations

import torch

from data_pipeline import DataError
from data_pipeline.jsonl import jsonl_records
from data_pipeline.microbatch import Microbatch
from data_pipeline.sft import SFTData, check_messages, encode_chat, encode_text_pair

KEYS = ("prompt", "chosen", "rejected")
"""Text fields of a preference line."""


def read_pairs(paths, tokenizer, key: str = "inputs") -> tuple[list, list]:
    """(chosen examples, rejected examples) of the JSONL files `paths`; errors name file and line."""
    chosen, rejected = [], []
    plain = tokenizer.chat_template is None
    for where, record in jsonl_records(paths, key, "{prompt, chosen, rejected} lines"):
        if all(isinstance(record.get(k), list) for k in KEYS):
            prompt = check_messages(record["prompt"], where, "prompt", plain)
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                messages = prompt + check_messages(record[side], where, side, plain)
                out.append(encode_chat(messages, tokenizer, first_trained=len(prompt), where=where))
            continue
        if not all(isinstance(record.get(k), str) for k in KEYS):
            raise DataError(f"{where}: expected text fields {list(KEYS)} (or three lists of messages); "
                            f"found {sorted(record)}")
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            out.append(encode_text_pair(record["prompt"], record[side], tokenizer))
    if not chosen:
        raise DataError(f"{key}={[str(p) for p in paths]}: no preference pairs")
    return chosen, rejected


class PreferenceData:
    """Preference microbatches (tokens [2 mbs, seq+1], loss mask [2 mbs, seq]): chosen rows, then rejected."""

    def __init__(self, chosen: list, rejected: list, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, pad_id: int):
        self.sides = [SFTData(examples, seq_length, seed, global_batch_size, micro_batch_size, pad_id)
                      for examples in (chosen, rejected)]

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """The (tokens, loss mask) of this (step, microbatch, dp rank): mbs chosen rows, then mbs rejected."""
        halves = [side.microbatch(step, microbatch, dp_rank, dp_size, skip_steps) for side in self.sides]
        return Microbatch(torch.cat([h.tokens for h in halves]), torch.cat([h.loss_mask for h in halves]))

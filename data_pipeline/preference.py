"""Preference pairs for DPO: {prompt, chosen, rejected} JSONL lines -> paired SFT-style samples.

A pair is two examples sharing the prompt: prompt + chosen and prompt + rejected, each trained on
its response only (data_pipeline/sft.py's rules: BOS where the tokenizer adds one, the response
ending with the declared EOS). TRL's conversational form, {"prompt": [messages], "chosen":
[messages], "rejected": [messages]}, is rendered with the tokenizer's chat template (or the plain
format without one) and trains the chosen / rejected assistant turns only. Both sides are addressed like SFT
samples with the same seed, so sample p of the run is the same pair on both sides; a microbatch
stacks the chosen sequences of its mbs pairs, then their rejected ones.

Pairs that cannot teach anything are caught when read. A pair whose chosen and rejected tokens
are the same (within the seq_length + 1 tokens a sample keeps) has a DPO gradient of exactly 0:
all of them is an error, some a note with their count and lines. A pair of which one side keeps
no trained token once truncated (a prompt as long as the sample) would add a constant log 2 to the
loss: it is dropped, with a count in the notes.
"""
from __future__ import annotations

from typing import Optional

import torch

from data_pipeline import DataError
from data_pipeline.jsonl import jsonl_records
from data_pipeline.microbatch import Microbatch
from data_pipeline.sft import SFTData, check_messages, encode_chat, encode_text_pair

KEYS = ("prompt", "chosen", "rejected")
"""Text fields of a preference line."""


def _listed(places: list[str], most: int = 5) -> str:
    return ", ".join(places[:most]) + (f" and {len(places) - most} more" if len(places) > most else "")


def _encode_pair(record: dict, tokenizer, where: str, plain: bool) -> list:
    """[chosen (ids, trained), rejected (ids, trained)] of one line: three texts, or three lists of messages."""
    if all(isinstance(record.get(k), list) for k in KEYS):
        prompt = check_messages(record["prompt"], where, "prompt", plain)
        return [encode_chat(prompt + check_messages(record[side], where, side, plain), tokenizer,
                            first_trained=len(prompt), where=where) for side in ("chosen", "rejected")]
    if not all(isinstance(record.get(k), str) for k in KEYS):
        raise DataError(f"{where}: expected text fields {list(KEYS)} (or three lists of messages); "
                        f"found {sorted(record)}")
    return [encode_text_pair(record["prompt"], record[side], tokenizer) for side in ("chosen", "rejected")]


def read_pairs(paths, tokenizer, key: str = "inputs", seq_length: Optional[int] = None,
               notes: Optional[list] = None) -> tuple[list, list]:
    """(chosen examples, rejected examples) of the JSONL files `paths`; errors name file and line.

    With `seq_length`, pairs are judged as samples keep them (seq_length + 1 tokens): those with a
    side left without a trained token are dropped; `notes` receives a line per dropped or useless kind.
    """
    chosen, rejected, same, untrained = [], [], [], []
    keep = None if seq_length is None else seq_length + 1
    plain = tokenizer.chat_template is None
    for where, record in jsonl_records(paths, key, "{prompt, chosen, rejected} lines"):
        pair = _encode_pair(record, tokenizer, where, plain)
        if keep is not None and not all(any(trained[1:keep]) for _, trained in pair):
            untrained.append(where)
            continue
        if pair[0][0][:keep] == pair[1][0][:keep]:
            same.append(where)
        chosen.append(pair[0])
        rejected.append(pair[1])
    if not chosen and not untrained:
        raise DataError(f"{key}={[str(p) for p in paths]}: no preference pairs")
    within = "" if keep is None else f" within model.seq_length + 1 = {keep} tokens"
    if not chosen:
        raise DataError(f"{key}: no pair keeps a trained token of both responses{within} ({_listed(untrained)}): "
                        f"shorten the prompts or raise model.seq_length")
    if len(same) == len(chosen):
        raise DataError(f"{key}: every pair has chosen == rejected{within} ({_listed(same)}): the DPO gradient "
                        f"of an identical pair is 0, nothing would be learned")
    if notes is not None and same:
        notes.append(f"{key}: {len(same)} of {len(chosen)} pairs have chosen == rejected{within} ({_listed(same)}); "
                     f"they train nothing (their DPO gradient is 0)")
    if notes is not None and untrained:
        notes.append(f"{key}: dropped {len(untrained)} of {len(chosen) + len(untrained)} pairs whose chosen or "
                     f"rejected response has no token left{within} ({_listed(untrained)})")
    return chosen, rejected


class PreferenceData:
    """Preference microbatches (tokens [2 mbs, seq+1], loss mask [2 mbs, seq]): chosen rows, then rejected."""

    def __init__(self, chosen: list, rejected: list, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, pad_id: int, notes: Optional[list] = None):
        # What reading the pairs dropped or found useless: the runner prints it once, before ranks start.
        self.notes = list(notes or [])
        self.sides = [SFTData(examples, seq_length, seed, global_batch_size, micro_batch_size, pad_id)
                      for examples in (chosen, rejected)]

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """The (tokens, loss mask) of this (step, microbatch, dp rank): mbs chosen rows, then mbs rejected."""
        halves = [side.microbatch(step, microbatch, dp_rank, dp_size, skip_steps) for side in self.sides]
        return Microbatch(torch.cat([h.tokens for h in halves]), torch.cat([h.loss_mask for h in halves]))

"""Supervised fine-tuning data: prompt/response pairs or chat messages -> tokens and a loss mask.

Each line of a JSONL file is one example, either
    {"prompt": "...", "response": "..."}          (keys settable), or
    {"messages": [{"role": "user"|"system"|"assistant", "content": "..."}, ...]}.
An example becomes tokens with a per-token *trained* flag: prompt/user/system text is context
(not trained), the response or every assistant turn is trained, and each trained span ends with
the end-of-document token, which is trained too (the model learns to stop). Chat messages are
rendered as "<role>: <content>\\n" before their tokens; an assistant turn trains on its content
and EOD, not on its "assistant: " header.

Samples are one example each, truncated to seq_length + 1 tokens or padded with the tokenizer's
pad id (padding is never trained). Sample p of the run is example perm_e[p % n] with
e = p // n and perm_e a permutation drawn from (seed, e): a fresh shuffle per epoch, and a pure
function of the position, so a resumed or re-laid-out run reads the same samples. Microbatches
are addressed like the pre-training loader's (data_pipeline.loader.sample_position).
"""
from __future__ import annotations

import torch

from data_pipeline import DataError
from data_pipeline.jsonl import jsonl_records
from data_pipeline.loader import sample_position
from data_pipeline.microbatch import Microbatch

ROLES = ("system", "user", "assistant")
"""Chat roles accepted in `messages`; only assistant turns are trained."""


def encode_example(record: dict, tokenizer, prompt_key: str = "prompt", response_key: str = "response",
                   where: str = "example") -> tuple[list[int], list[int]]:
    """(token ids, trained flag per token) of one JSON record; DataError naming `where` if malformed."""
    eod = tokenizer.eod_id
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        tokens, trained = [], []
        for k, message in enumerate(messages):
            role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
            if role not in ROLES or not isinstance(content, str):
                raise DataError(f"{where}: messages[{k}] = {message!r}: expected {{'role': one of {list(ROLES)}, "
                                f"'content': text}}")
            header = tokenizer.encode(f"{role}: ")
            body = tokenizer.encode(content) + ([eod] if role == "assistant" else tokenizer.encode("\n"))
            tokens += header + body
            trained += [0] * len(header) + [int(role == "assistant")] * len(body)
        if not any(trained):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        return tokens, trained
    prompt, response = record.get(prompt_key), record.get(response_key)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: expected text fields {prompt_key!r} and {response_key!r} (or 'messages'); "
                        f"found keys {sorted(record)}")
    context, answer = tokenizer.encode(prompt), tokenizer.encode(response) + [eod]
    return context + answer, [0] * len(context) + [1] * len(answer)


def trained_text(record: dict, response_key: str = "response") -> str:
    """The text an example trains on: its response, or its assistant turns joined ('' when all are empty)."""
    if "messages" in record:
        return "".join(m["content"] for m in record["messages"] if m.get("role") == "assistant")
    return record.get(response_key, "")


def read_examples(paths, tokenizer, prompt_key: str = "prompt", response_key: str = "response",
                  key: str = "inputs") -> list:
    """Every example of the JSONL files `paths`, encoded; errors name the file and line.

    A file whose every response is empty is refused: its examples would train the end-of-document
    token alone, i.e. teach the model to answer nothing (a wrong `response_key`, or a broken export).
    """
    examples, with_text = [], {}
    for where, record in jsonl_records(paths, key, "one example per line"):
        examples.append(encode_example(record, tokenizer, prompt_key, response_key, where))
        file = where.rsplit(":", 1)[0]
        with_text[file] = with_text.get(file, 0) + int(bool(trained_text(record, response_key).strip()))
    if not examples:
        raise DataError(f"{key}={[str(p) for p in paths]}: no examples")
    empty = [file for file, count in with_text.items() if count == 0]
    if empty:
        raise DataError(f"{key}: {empty[0]}: every response is empty (in {response_key!r} or the assistant turns), "
                        f"so its examples would train nothing but the end-of-document token")
    return examples


class SFTData:
    """SFT samples addressed by (step, microbatch, dp rank); microbatches are (tokens, loss mask)."""

    def __init__(self, examples: list, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, pad_id: int):
        self.examples, self.seq_length, self.seed = examples, seq_length, seed
        self.global_batch_size, self.micro_batch_size, self.pad_id = global_batch_size, micro_batch_size, pad_id
        self._perms: dict[int, torch.Tensor] = {}

    def _example(self, position: int) -> tuple[list[int], list[int]]:
        epoch, index = divmod(position, len(self.examples))
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=gen)
        return self.examples[int(self._perms[epoch][index])]

    def sample(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [seq + 1], loss mask [seq]) of global sample `position`: mask[t] says target t+1 trains."""
        tokens, trained = self._example(position)
        n = self.seq_length + 1
        tokens, trained = tokens[:n], trained[:n]
        pad = n - len(tokens)
        ids = torch.tensor(tokens + [self.pad_id] * pad, dtype=torch.int64)
        mask = torch.tensor(trained[1:] + [0] * pad, dtype=torch.float32)
        return ids, mask

    def microbatch(self, step: int, microbatch: int, dp_rank: int, dp_size: int, skip_steps=()) -> Microbatch:
        """(tokens [mbs, seq + 1], loss mask [mbs, seq]) for this (step, microbatch, dp rank)."""
        first = sample_position(step, microbatch, dp_rank, dp_size, self.global_batch_size,
                                self.micro_batch_size, skip_steps)
        rows = [self.sample(first + i) for i in range(self.micro_batch_size)]
        return Microbatch(torch.stack([t for t, _ in rows]), torch.stack([m for _, m in rows]))

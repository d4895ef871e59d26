"""Supervised fine-tuning data: prompt/response pairs or chat messages -> tokens and a loss mask.

Each line of a JSONL file is one example, either
    {"prompt": "...", "response": "..."}          (keys settable), or
    {"messages": [{"role": "user"|"system"|"assistant", "content": "..."}, ...]}, or
    {"prompt": [messages], "response": [messages]} (a conversation and its continuation).
An example becomes tokens with a per-token *trained* flag, the tokenizer's conventions applied
(data_pipeline/tokenizer.py), as TRL applies them:
- prompt/response text: the tokenizer's BOS (when it adds one), the prompt as context, then the
  response and the declared EOS, trained (the model learns to stop);
- messages, with a tokenizer that has a chat template: the conversation rendered by the
  template as transformers renders it, ids equal to apply_chat_template's, the assistant turns
  trained as transformers and TRL find them (data_pipeline/chat_template.py); with a
  prompt/response conversation only the response's assistant turns train;
- messages, with a tokenizer without a template (the byte tokenizer): Apogee's plain format,
  BOS, then "<role>: <content>\n" per message, an assistant turn trained on its content and the
  EOS that ends it instead of the newline (not on its "assistant: " header).

Samples are one example each, truncated to seq_length + 1 tokens or padded with the tokenizer's
pad id (padding is never trained). Sample p of the run is example perm_e[p % n] with
e = p // n and perm_e a permutation drawn from (seed, e): a fresh shuffle per epoch, and a pure
function of the position, so a resumed or re-laid-out run reads the same samples. Microbatches
are addressed like the pre-training loader's (data_pipeline.loader.sample_position).
"""
from __future__ import annotations

import torch

from data_pipeline import DataError
from data_pipeline.chat_template import overlap_mask
from data_pipeline.jsonl import jsonl_records
from data_pipeline.loader import sample_position
from data_pipeline.microbatch import Microbatch

ROLES = ("system", "user", "assistant")
"""Chat roles of the plain format (a chat template may accept others); only assistant turns train."""


def check_messages(messages, where: str, key: str = "messages", plain: bool = True) -> list:
    """`messages` as a list of {role, content} dicts, or DataError naming `where` and the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects")
    for k, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if (role not in ROLES if plain else not isinstance(role, str)) or not isinstance(content, str):
            roles = f"one of {list(ROLES)}" if plain else "text"
            raise DataError(f"{where}: {key}[{k}] = {message!r}: expected {{'role': {roles}, 'content': text}}")
    return messages


def encode_chat(messages: list, tokenizer, first_trained: int = 0, where: str = "example") -> tuple[list, list]:
    """(token ids, trained flags) of a conversation: its assistant turns from message
    `first_trained` on are trained (see the module doc for the two formats)."""
    template = tokenizer.chat_template
    check_messages(messages, where, plain=template is None)
    if template is not None:
        text, spans = template.trained_spans(messages, first_trained, where)
        tokens, offsets = tokenizer.encode_with_offsets(text)
        trained = overlap_mask(offsets, spans)
    else:
        tokens, trained = list(tokenizer.bos_prefix), [0] * len(tokenizer.bos_prefix)
        for k, message in enumerate(messages):
            role, content = message["role"], message["content"]
            header = tokenizer.encode(f"{role}: ")
            body = tokenizer.encode(content) + ([tokenizer.eos_id] if role == "assistant" else tokenizer.encode("\n"))
            tokens += header + body
            trained += [0] * len(header) + [int(role == "assistant" and k >= first_trained)] * len(body)
    if not any(trained):
        raise DataError(f"{where}: no assistant message to train on"
                        + (f" from message {first_trained} on" if first_trained else ""))
    return tokens, trained


def encode_prompt(prompt, tokenizer, where: str = "example") -> list:
    """Token ids that ask for a response: BOS + text, or a conversation rendered with the chat
    template's generation prompt (the plain format: its messages, then "assistant: ")."""
    if isinstance(prompt, str):
        return list(tokenizer.bos_prefix) + tokenizer.encode(prompt)
    template = tokenizer.chat_template
    messages = check_messages(prompt, where, "prompt", plain=template is None)
    if template is not None:
        return tokenizer.encode(template.render(messages, add_generation_prompt=True))
    ids = list(tokenizer.bos_prefix)
    for message in messages:
        ids += tokenizer.encode(f"{message['role']}: {message['content']}")
        ids += [tokenizer.eos_id] if message["role"] == "assistant" else tokenizer.encode("\n")
    return ids + tokenizer.encode("assistant: ")


def encode_text_pair(prompt: str, response: str, tokenizer) -> tuple[list, list]:
    """(token ids, trained flags) of BOS + prompt (context) + response + EOS (trained)."""
    context = list(tokenizer.bos_prefix) + tokenizer.encode(prompt)
    answer = tokenizer.encode(response) + [tokenizer.eos_id]
    return context + answer, [0] * len(context) + [1] * len(answer)


def encode_example(record: dict, tokenizer, prompt_key: str = "prompt", response_key: str = "response",
                   where: str = "example") -> tuple[list[int], list[int]]:
    """(token ids, trained flag per token) of one JSON record; DataError naming `where` if malformed."""
    if "messages" in record:
        return encode_chat(record["messages"], tokenizer, where=where)
    prompt, response = record.get(prompt_key), record.get(response_key)
    if isinstance(prompt, list) and isinstance(response, list):
        plain = tokenizer.chat_template is None
        check_messages(prompt, where, prompt_key, plain)
        check_messages(response, where, response_key, plain)
        return encode_chat(prompt + response, tokenizer, first_trained=len(prompt), where=where)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: expected text fields {prompt_key!r} and {response_key!r} (or 'messages'); "
                        f"found keys {sorted(record)}")
    return encode_text_pair(prompt, response, tokenizer)


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

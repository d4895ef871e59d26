"""Prompts for generation and evaluation: plain text or chat messages, read from JSONL with errors
that name file:line, rendered to token ids.

A chat prompt (`{"messages": [...]}`, or plain text under `--chat`, which becomes one user
message) is rendered with the tokenizer's chat template when it has one (`apply_chat_template`,
as Hugging Face tokenizers do; the hook for data_pipeline/tokenizer.py's templates), else in the
plain format SFT trains on (data_pipeline/sft.py): "<role>: <content>\\n" per message, then the
"assistant: " header the model continues.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from data_pipeline import DataError
from data_pipeline.jsonl import jsonl_records
from data_pipeline.sft import ROLES


class PromptItem(NamedTuple):
    """One prompt: where it came from (file:line or '--prompt'), its text, its token ids and, for a
    task, its answer."""

    where: str
    text: str
    ids: tuple
    answer: Optional[str] = None


def render_chat(messages: list, tokenizer, where: str = "prompt") -> list[int]:
    """Token ids of `messages` followed by the assistant's turn header (see the module doc)."""
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{k}] = {message!r}: expected {{'role': one of {list(ROLES)}, "
                            f"'content': text}}")
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template):
        ids = template(messages, add_generation_prompt=True)
        return list(tokenizer.encode(ids) if isinstance(ids, str) else ids)
    ids: list[int] = []
    for message in messages:
        ids += tokenizer.encode(f"{message['role']}: ") + tokenizer.encode(message["content"] + "\n")
    return ids + tokenizer.encode("assistant: ")


def encode_prompt(record: dict, tokenizer, chat: bool, where: str, answer_key: Optional[str] = None) -> PromptItem:
    """A JSON record ({prompt} or {messages}; with `answer_key`, its answer too) -> PromptItem."""
    answer = None
    if answer_key is not None:
        answer = record.get(answer_key)
        if not isinstance(answer, str):
            raise DataError(f"{where}: expected a text field {answer_key!r} (the answer to check); "
                            f"found keys {sorted(record)}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        ids = render_chat(messages, tokenizer, where)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    else:
        text = record.get("prompt")
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a text field 'prompt' (or 'messages'); found keys {sorted(record)}")
        ids = render_chat([{"role": "user", "content": text}], tokenizer, where) if chat else tokenizer.encode(text)
    if not ids:
        raise DataError(f"{where}: the prompt is empty (0 tokens); a prompt needs at least one token")
    return PromptItem(where, text, tuple(ids), answer)


def read_prompt_file(path: str, tokenizer, chat: bool, option: str = "--prompts",
                     answer_key: Optional[str] = None) -> list[PromptItem]:
    """Every prompt of a JSONL file; DataError naming file:line for a malformed line."""
    expected = "{prompt, answer} lines" if answer_key else "{prompt} or {messages} lines"
    items = [encode_prompt(record, tokenizer, chat, where, answer_key)
             for where, record in jsonl_records([path], option, expected)]
    if not items:
        raise DataError(f"{option} {path}: no prompts (expected JSONL: {expected})")
    return items


def check_lengths(items: list[PromptItem], max_new_tokens: int, seq_length: int,
                  option: str = "--max-new-tokens") -> None:
    """Refuse a prompt whose tokens plus max_new_tokens exceed the model's context (file:line named)."""
    for item in items:
        if len(item.ids) + max_new_tokens > seq_length:
            raise DataError(f"{item.where}: the prompt is {len(item.ids)} tokens; with {option} {max_new_tokens} "
                            f"it exceeds the model's seq_length={seq_length} (at most "
                            f"{seq_length - max_new_tokens} prompt tokens fit)")

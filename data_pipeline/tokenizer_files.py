"""A tokenizer's files in a Hugging Face model directory, so `AutoTokenizer` gives the ids we trained on.

- The byte tokenizer becomes an equivalent tokenizer.json: a byte-level BPE without merges whose
  token for byte b (GPT-2's printable stand-in for it) has id b, and <|endoftext|> = 256 (EOD and
  EOS) and <pad> = 257 as special tokens. Text encodes to its UTF-8 bytes as ByteTokenizer does
  (a literal "<|endoftext|>" in a text is the one difference: transformers reads it as the token).
- A Hugging Face tokenizer is copied with the files next to it (tokenizer_config.json,
  special_tokens_map.json, chat_template.jinja).
Where the tokenizer has no chat template, tokenizer_config.json gets Apogee's plain format as one
(data_pipeline/chat_template.py: plain_template), the format SFT rendered its chats in, so an
inference server sends the fine-tuned model what it was trained on.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_pipeline.chat_template import plain_template
from data_pipeline.tokenizer import SIDE_FILES, get_tokenizer, tokenizer_file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (ByteLevel's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer_json(path: Path) -> None:
    """Write the byte tokenizer as a `tokenizers` JSON file (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = get_tokenizer("byte").special_tokens
    tokenizer.add_special_tokens([AddedToken(specials[name], special=True, normalized=False)
                                  for name in ("eos_token", "pad_token")])  # ids 256, 257
    tokenizer.save(str(path))


def write_tokenizer_files(name_or_path: str, out_dir) -> dict:
    """Write the tokenizer `name_or_path` ('byte' or an HF tokenizer) into `out_dir`; returns the
    {bos_token_id, eos_token_id, pad_token_id} that config.json and generation_config.json carry."""
    out_dir = Path(out_dir)
    tokenizer = get_tokenizer(name_or_path)
    config: dict = {}
    if name_or_path == "byte":
        byte_tokenizer_json(out_dir / "tokenizer.json")
    else:
        source = tokenizer_file(name_or_path)
        shutil.copyfile(source, out_dir / "tokenizer.json")
        for side in SIDE_FILES:
            side_path = os.path.join(os.path.dirname(source), side)
            if os.path.isfile(side_path):
                shutil.copyfile(side_path, out_dir / side)
        if (out_dir / SIDE_FILES[0]).is_file():
            config = json.loads((out_dir / SIDE_FILES[0]).read_text())
    from tokenizers import Tokenizer

    names = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    # What we trained with, declared where the source's files leave it out (the plain template reads them).
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("eos_token", names.id_to_token(tokenizer.eos_id))
    config.setdefault("pad_token", names.id_to_token(tokenizer.pad_id))
    if tokenizer.bos_prefix:
        config.setdefault("bos_token", names.id_to_token(tokenizer.bos_prefix[0]))
    if tokenizer.chat_template is None:
        config["chat_template"] = plain_template(bos=bool(tokenizer.bos_prefix))
    (out_dir / SIDE_FILES[0]).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    tokens = {"bos_token_id": tokenizer.bos_prefix[0] if tokenizer.bos_prefix else None,
              "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return tokens

"""The byte tokenizer as Hugging Face tokenizer files, so that an exported checkpoint runs under
transformers (`AutoTokenizer`) and lm-evaluation-harness (`lm_eval --model hf`).

tokenizer.json is a `tokenizers` BPE with no merges over GPT-2's byte-to-unicode alphabet, the
byte-level pre-tokenizer without its regex and the byte-level decoder: every UTF-8 byte b is one
token with id b, exactly as data_pipeline/tokenizer.ByteTokenizer; <|endoftext|> is EOD (256)
and <pad> is 257.
"""
from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.tokenizer import BYTE_EOD_ID, BYTE_PAD_ID

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character of each byte 0..255 (the byte-level pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def save_byte_tokenizer(directory) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True), AddedToken(PAD_TOKEN, special=True)])
    assert tokenizer.token_to_id(EOD_TOKEN) == BYTE_EOD_ID and tokenizer.token_to_id(PAD_TOKEN) == BYTE_PAD_ID
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN,
              "bos_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]

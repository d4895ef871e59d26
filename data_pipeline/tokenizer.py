"""Tokenizers: a byte-level default (no download) and Hugging Face tokenizer files, with the
conventions those files declare.

`get_tokenizer("byte")` maps UTF-8 bytes 0..255 to ids 0..255 and adds EOD = 256 and pad = 257
(vocab_size 258). Any other name is a `tokenizer.json` or a directory holding one (a Hugging
Face model directory). Next to it, `tokenizer_config.json` (and `special_tokens_map.json`, an
older file) declare the special tokens and `chat_template.jinja` or tokenizer_config's
`chat_template` the chat format. What a tokenizer declares is what fine-tuning uses, as
transformers and TRL do:
- `bos_prefix`: the ids the tokenizer puts before a text, read from tokenizer.json's
  post-processor (Llama 3's "<|begin_of_text|> $A"; transformers 5 also goes by the
  post-processor, dropping tokenizer_config's add_bos_token when a tokenizer.json exists);
- `eos_id`: the declared eos_token (Llama 3 Instruct: <|eot_id|>), trained at the end of a
  response; without a declaration, the end-of-document token;
- `pad_id`: the declared pad_token, else a conventional pad token, else EOD;
- `eod_id`: the end-of-document token that separates pre-training documents: a conventional one
  (<|endoftext|>, <|end_of_text|>, </s>, ...), else the declared eos_token.
The byte tokenizer keeps its own ids (no BOS, EOS = EOD = 256).
"""
import hashlib
import json
import os
from types import MappingProxyType
from typing import Optional

import numpy as np

from data_pipeline import DataError
from data_pipeline.chat_template import SPECIAL_TOKEN_NAMES, ChatTemplate

BYTE_EOD_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 258

# Special tokens tried, in order, for end-of-document and padding in HF tokenizer files.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Files next to tokenizer.json that change what a tokenizer declares."""


class ByteTokenizer:
    """UTF-8 bytes as token ids; EOD = EOS = 256, pad = 257, vocab_size = 258, no BOS."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eod_id = eos_id = BYTE_EOD_ID
    pad_id = BYTE_PAD_ID
    bos_prefix = ()
    chat_template = None
    special_tokens = MappingProxyType({"eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    """The names of EOD and pad in the equivalent tokenizer.json (data_pipeline/tokenizer_files.py)."""

    def encode(self, text: str) -> list:
        """Token ids of `text` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array (the fast path used by preprocess)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_with_offsets(self, text: str) -> tuple[list, list]:
        """(ids, (start, end) character span of each id): every byte of a character spans it."""
        ids, offsets = [], []
        for i, char in enumerate(text):
            data = char.encode("utf-8")
            ids += data
            offsets += [(i, i + 1)] * len(data)
        return ids, offsets

    def decode(self, ids) -> str:
        """Text of `ids`; EOD and pad are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"tokenizer file {path!r}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"tokenizer file {path!r}: expected a JSON object")
    return data


def declared_special_tokens(directory: str) -> tuple[dict, Optional[str]]:
    """({bos_token: "...", eos_token: ...}, chat template source or None) from the files in `directory`."""
    config_path, map_path = (os.path.join(directory, f) for f in SIDE_FILES[:2])
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    fallback = _read_json(map_path) if os.path.isfile(map_path) else {}
    tokens = {name: _token_text(config.get(name, fallback.get(name))) for name in SPECIAL_TOKEN_NAMES}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = os.path.join(directory, SIDE_FILES[2])
    if os.path.isfile(jinja):  # transformers: a chat_template.jinja file takes priority over the config's
        with open(jinja, encoding="utf-8") as handle:
            template = handle.read()
    return {k: v for k, v in tokens.items() if v is not None}, template if isinstance(template, str) else None


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file and the conventions its directory declares (module doc)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # optional dependency, only needed for JSON files

        self.name = os.path.abspath(path)
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises bare Exceptions with Rust messages
            raise DataError(f"tokenizer {path!r}: cannot load as a tokenizers JSON file ({error})") from error
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        directory = os.path.dirname(self.name)
        self.special_tokens, template = declared_special_tokens(directory)
        for name, token in self.special_tokens.items():
            if token not in vocab and name in ("bos_token", "eos_token", "pad_token"):
                raise DataError(f"tokenizer {directory}: {name}={token!r} is not in {path}'s vocabulary")
        declared = {name: vocab[token] for name, token in self.special_tokens.items() if token in vocab}
        eod = next((vocab[t] for t in _EOD_CANDIDATES if t in vocab), declared.get("eos_token"))
        if eod is None:
            raise DataError(f"tokenizer {path!r}: no end-of-document token; expected one of {list(_EOD_CANDIDATES)} "
                            f"or an eos_token in tokenizer_config.json")
        self.eod_id = eod
        self.eos_id = declared.get("eos_token", eod)
        # Without a pad token, padding reuses EOD (as GPT-2 style tokenizers do); padding never trains.
        self.pad_id = declared.get("pad_token", next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), eod))
        self.bos_prefix = self._prefix()
        self.chat_template = ChatTemplate(template, self.special_tokens, f"{directory}") if template else None

    def _prefix(self) -> list:
        """The ids the post-processor puts before a text (BOS), found by encoding a probe both ways."""
        plain = self._tokenizer.encode("a b", add_special_tokens=False).ids
        full = self._tokenizer.encode("a b", add_special_tokens=True).ids
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
        return full[:starts[0]] if plain and starts else []

    def encode(self, text: str) -> list:
        """Token ids of `text` (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[list, list]:
        """(ids, (start, end) character span of each id) of `text`, no special tokens added."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids) -> str:
        """Text of `ids`."""
        return self._tokenizer.decode([int(i) for i in ids])


def tokenizer_file(name_or_path: str) -> Optional[str]:
    """The tokenizer.json that `name_or_path` names (the file, or one in the directory), or None."""
    if not isinstance(name_or_path, str):
        return None
    if os.path.isdir(name_or_path):
        candidate = os.path.join(name_or_path, "tokenizer.json")
        return candidate if os.path.isfile(candidate) else None
    return name_or_path if os.path.isfile(name_or_path) else None


def get_tokenizer(name_or_path: str):
    """'byte' -> ByteTokenizer; a tokenizer.json or a directory with one -> HFTokenizer; else DataError."""
    if name_or_path == "byte":
        return ByteTokenizer()
    path = tokenizer_file(name_or_path)
    if path is not None:
        return HFTokenizer(path)
    raise DataError(f"tokenizer {name_or_path!r}: unknown; valid choices are 'byte' or the path of an "
                    f"existing Hugging Face tokenizer.json file (or of a directory holding one)")


def tokenizer_fingerprint(name_or_path: str) -> str:
    """A string that changes whenever the tokenizer's output could change (for cache keys)."""
    if name_or_path == "byte":
        return "byte-v1"
    get_tokenizer(name_or_path)  # validates, raising DataError with the valid choices
    path = tokenizer_file(name_or_path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read())
    for side in SIDE_FILES:  # what they declare can change EOD
        side_path = os.path.join(os.path.dirname(path), side)
        if os.path.isfile(side_path):
            with open(side_path, "rb") as handle:
                digest.update(side.encode() + handle.read())
    return "hf-" + digest.hexdigest()[:16]

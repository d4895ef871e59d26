"""Tokenizers: a byte-level default (no download) and Hugging Face `tokenizers` JSON files.

`get_tokenizer("byte")` maps UTF-8 bytes 0..255 to ids 0..255 and adds EOD = 256 and pad = 257
(vocab_size 258). Any other name must be the path of a `tokenizer.json`.
"""
import hashlib
import os

import numpy as np

from data_pipeline import DataError

BYTE_EOD_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 258

# Special tokens tried, in order, for end-of-document and padding in HF tokenizer files.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids; EOD = 256, pad = 257, vocab_size = 258."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eod_id = BYTE_EOD_ID
    pad_id = BYTE_PAD_ID

    def encode(self, text: str) -> list:
        """Token ids of `text` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array (the fast path used by preprocess)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        """Text of `ids`; EOD and pad are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; EOD and pad are found among its special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # optional dependency, only needed for JSON files

        self.name = os.path.abspath(path)
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # tokenizers raises bare Exceptions with Rust messages
            raise DataError(f"tokenizer {path!r}: cannot load as a tokenizers JSON file ({error})") from error
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eod = next((vocab[t] for t in _EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise DataError(f"tokenizer {path!r}: no end-of-document token; expected one of {list(_EOD_CANDIDATES)}")
        self.eod_id = eod
        # Without a pad token, padding reuses EOD (as GPT-2 style tokenizers do).
        self.pad_id = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), eod)

    def encode(self, text: str) -> list:
        """Token ids of `text` (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        """Text of `ids`."""
        return self._tokenizer.decode([int(i) for i in ids])


def get_tokenizer(name_or_path: str):
    """'byte' -> ByteTokenizer; a path to a tokenizer.json -> HFTokenizer; else DataError."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if isinstance(name_or_path, str) and os.path.isfile(name_or_path):
        return HFTokenizer(name_or_path)
    raise DataError(f"tokenizer {name_or_path!r}: unknown; valid choices are 'byte' or the path of an "
                    f"existing Hugging Face tokenizer.json file")


def tokenizer_fingerprint(name_or_path: str) -> str:
    """A string that changes whenever the tokenizer's output could change (for cache keys)."""
    if name_or_path == "byte":
        return "byte-v1"
    get_tokenizer(name_or_path)  # validates, raising DataError with the valid choices
    with open(name_or_path, "rb") as handle:
        return "hf-" + hashlib.sha256(handle.read()).hexdigest()[:16]

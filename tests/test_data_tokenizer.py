"""tokenizer: byte-level default and Hugging Face tokenizer.json files."""
import pytest

from data_pipeline import DataError
from data_pipeline.tokenizer import get_tokenizer


def test_byte_tokenizer_ids_are_utf8_bytes_with_eod_256_and_pad_257():
    tokenizer = get_tokenizer("byte")
    assert (tokenizer.vocab_size, tokenizer.eod_id, tokenizer.pad_id) == (258, 256, 257)
    assert tokenizer.encode("Aé") == [65, 0xC3, 0xA9]
    assert tokenizer.encode_array("Aé").tolist() == [65, 0xC3, 0xA9]
    assert tokenizer.decode([72, 105, 256, 257]) == "Hi"
    text = "naïve — ünïcödé ✓\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_tokenizer_lists_valid_choices():
    with pytest.raises(DataError, match=r"'gpt9'.*'byte' or the path of an existing Hugging Face tokenizer.json"):
        get_tokenizer("gpt9")


def _write_hf_tokenizer(path, with_eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<pad>": 3}
    if with_eos:
        vocab["</s>"] = 4
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def test_hf_tokenizer_json_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_hf_tokenizer(path)
    tokenizer = get_tokenizer(str(path))
    assert (tokenizer.vocab_size, tokenizer.eod_id, tokenizer.pad_id) == (5, 4, 3)
    assert tokenizer.encode("hello world zzz") == [1, 2, 0]
    assert tokenizer.decode([1, 2]) == "hello world"


def test_hf_tokenizer_without_eod_token_is_rejected(tmp_path):
    path = tmp_path / "noeos.json"
    _write_hf_tokenizer(path, with_eos=False)
    with pytest.raises(DataError, match="noeos.json.*no end-of-document token"):
        get_tokenizer(str(path))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(DataError, match="garbage.json.*cannot load"):
        get_tokenizer(str(tmp_path / "garbage.json"))

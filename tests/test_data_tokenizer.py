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


# ---------------------------------------------------------------------------------------------
# What tokenizer_config.json declares (a Llama-3-like tokenizer built locally, tests/hf_fixtures.py)


def test_llama3_like_tokenizer_takes_bos_eos_from_its_files_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.hf_fixtures import write_llama3_tokenizer

    directory = write_llama3_tokenizer(tmp_path / "llama3")
    ours, theirs = get_tokenizer(str(directory)), transformers.AutoTokenizer.from_pretrained(str(directory))
    vocab = theirs.get_vocab()
    assert ours.bos_prefix == [vocab["<|begin_of_text|>"]] == [theirs.bos_token_id]
    assert ours.eos_id == vocab["<|eot_id|>"] == theirs.eos_token_id  # the declared EOS, not the first end token
    assert ours.eod_id == vocab["<|end_of_text|>"]  # pre-training documents still end with the end-of-text token
    text = "the quick brown fox jumps over the lazy dog."
    assert ours.bos_prefix + ours.encode(text) == theirs(text)["input_ids"]
    assert get_tokenizer(str(directory / "tokenizer.json")).eos_id == ours.eos_id  # the file or its directory


def test_special_tokens_map_declares_when_tokenizer_config_does_not(tmp_path):
    import json

    path = tmp_path / "tokenizer.json"
    _write_hf_tokenizer(path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "world"}, "pad_token": "hello"}))
    tokenizer = get_tokenizer(str(path))
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.eod_id, tokenizer.bos_prefix) == (2, 1, 4, [])
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(DataError, match=r"eos_token='<\|eot\|>' is not in .*tokenizer.json's vocabulary"):
        get_tokenizer(str(path))


def test_byte_tokenizer_exports_as_a_tokenizer_json_with_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from data_pipeline.sft import encode_chat
    from data_pipeline.tokenizer_files import write_tokenizer_files

    tokens = write_tokenizer_files("byte", tmp_path)
    assert tokens == {"bos_token_id": None, "eos_token_id": 256, "pad_token_id": 257}
    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), get_tokenizer("byte")
    text = "naïve — ünïcödé ✓\n\t  x\r\n{}"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id) == (256, 257, None)
    # The plain chat format SFT trained on is the exported template: same ids, same trained tokens.
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6 ✓"}]
    reference = theirs.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    assert encode_chat(chat, ours) == (reference["input_ids"], reference["assistant_masks"])
    prompt = theirs.apply_chat_template(chat[:2], add_generation_prompt=True, return_dict=False)
    assert reference["input_ids"][:len(prompt)] == prompt

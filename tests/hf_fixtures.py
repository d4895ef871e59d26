"""A Llama-3-like tokenizer built locally (no download): byte-level BPE with Llama 3's special
tokens, BOS added by its post-processor, eos_token <|eot_id|> and Llama 3 Instruct's chat template
in tokenizer_config.json, as meta-llama/Meta-Llama-3-8B-Instruct ships them (a 300-token vocabulary
instead of 128256)."""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
"""Llama 3 Instruct's chat template (no generation blocks: turns are found prefix by prefix)."""

LLAMA3_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
"""The same text with the assistant turns in {% generation %} blocks (as TRL's training templates mark them)."""

_CORPUS = ("the quick brown fox jumps over the lazy dog. what is two plus two? two plus two is four. "
           "you are a helpful assistant. hello, how are you today? i am fine, thank you. system user assistant "
           "the cat sat on the mat and the dog ran in the park. one two three four five six seven eight nine ten")


def write_llama3_tokenizer(directory: Path, template: str = LLAMA3_TEMPLATE, vocab_size: int = 300) -> Path:
    """tokenizer.json + tokenizer_config.json of a Llama-3-like tokenizer in `directory`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIALS))
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template,
              "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "what is two plus two?"},
     {"role": "assistant", "content": "two plus two is four."}],
    [{"role": "user", "content": "hello, how are you today?"}, {"role": "assistant", "content": "i am fine, thank you."},
     {"role": "user", "content": "one two three"}, {"role": "assistant", "content": " four five six "}],
    [{"role": "user", "content": "the quick brown fox"}, {"role": "assistant", "content": "jumps over the lazy dog."}],
    [{"role": "system", "content": "Count."}, {"role": "user", "content": "seven eight"},
     {"role": "assistant", "content": "nine ten"}],
]
"""Chat examples: a system prompt, several assistant turns, content with spaces to trim."""

"""Tokens from text to the training step, independent of the engine.

Modules, in the order data flows through them:
  tokenizer        byte-level default tokenizer; Hugging Face `tokenizers` JSON files
  corpus           named inputs ('stdlib') and preprocess-once caching of raw inputs
  readers          documents out of text, JSONL (.gz/.zst), Parquet, Arrow and `datasets` save_to_disk
  preprocess       those inputs and directories -> Megatron .bin/.idx, parallel workers
  indexed_dataset  mmap reader and writer of .bin/.idx, byte-compatible with megatron-core
  token_range      a dataset's token-id range, scanned once per .bin and cached; the vocabulary check
  gpt_dataset      shuffled document index, sample index (csrc helper), seq_length+1 samples
  blending         weighted mixtures and phase schedules over several datasets
  loader           TrainingData: the sample for (step, microbatch, dp rank) as a pure function

This package never imports `engine` or `parallel`.
"""


class DataError(ValueError):
    """Bad data input: the message names the file/line or field, the value and what is valid."""

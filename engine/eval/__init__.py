"""Is the trained model any good: validation during training, checkpoint evaluation and sampling.

  generate    KV-cache sampling on the engine's parallel model (apogee generate, eval tasks, GRPO)
  loading     a checkpoint of any layout, or a Hugging Face directory, as a model to sample from
  validation  validation data and the validation loss during training (train.eval_interval)
  evaluate    apogee eval: loss, perplexity, bits per byte, task accuracy and pass@k, side by side
"""

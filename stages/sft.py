"""`apogee sft`: supervised fine-tuning, the pre-training engine with a loss mask.

The same parallel model, trainer, checkpoints and resilience as `apogee pretrain`; what changes
is the data (data_pipeline/sft.py: examples whose prompts are context and whose responses are
trained, one per sample, padded), the loss (averaged over the step's trained tokens only), and
the start: `train.init_from` loads a pre-trained model's weights (engine/initialize.py).
"""
from __future__ import annotations

import argparse

from engine.config import ConfigError, load_config
from engine.runner import exit_on_config_error, run_job


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check it is a fine-tuning run, run it."""
    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        if cfg.grpo.inputs:
            raise ConfigError(f"grpo.inputs={cfg.grpo.inputs}: prompts with answers are trained by `apogee grpo`")
        if not cfg.sft.inputs:
            raise ConfigError("sft.inputs=[]: `apogee sft` needs JSONL files of examples, e.g. "
                              "--set sft.inputs=[data/train.jsonl] (lines {prompt, response} or {messages})")
        return run_job(cfg, run_dir=args.run_dir, nproc=args.nproc, resume=args.resume)
    return exit_on_config_error(run)

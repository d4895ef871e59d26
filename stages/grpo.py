"""`apogee grpo`: group relative policy optimisation with verifiable rewards (engine/grpo.py).

The same parallel model, checkpoints and resilience as the other stages; the step's data is
rollouts of the current policy on prompts with answers (data_pipeline/prompts.py), scored by a
reward function and trained with a clipped policy gradient and a KL penalty towards the frozen
starting weights (`train.init_from`, usually a fine-tuned model).
"""
from __future__ import annotations

import argparse

from engine.config import ConfigError, load_config
from engine.runner import exit_on_config_error, run_job


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check it is a GRPO run, run it."""
    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        if not cfg.grpo.inputs:
            raise ConfigError("grpo.inputs=[]: `apogee grpo` needs JSONL files of prompts with verifiable answers, "
                              "e.g. --set grpo.inputs=[prompts.jsonl] (lines {prompt, answer})")
        return run_job(cfg, run_dir=args.run_dir, nproc=args.nproc, resume=args.resume)
    return exit_on_config_error(run)

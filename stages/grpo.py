"""`apogee grpo`: group relative policy optimisation with verifiable rewards (engine/grpo.py).

The same parallel model, checkpoints and resilience as the other stages; the step's data is
rollouts of the current policy on prompts with answers (data_pipeline/prompts.py), scored by a
reward function and trained with a clipped policy gradient and a KL penalty towards the frozen
starting weights (`train.init_from`, usually a fine-tuned model).
"""
from __future__ import annotations

import argparse

from engine.runner import run_stage


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check its inputs are this stage's, run it."""
    return run_stage("grpo", args)

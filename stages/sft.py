"""`apogee sft`: supervised fine-tuning, the pre-training engine with a loss mask.

The same parallel model, trainer, checkpoints and resilience as `apogee pretrain`; what changes
is the data (data_pipeline/sft.py: examples whose prompts are context and whose responses are
trained, one per sample, padded), the loss (averaged over the step's trained tokens only), and
the start: `train.init_from` loads a pre-trained model's weights (engine/initialize.py).
"""
from __future__ import annotations

import argparse

from engine.runner import run_stage


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check its inputs are this stage's, run it."""
    return run_stage("sft", args)

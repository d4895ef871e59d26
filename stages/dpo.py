"""`apogee dpo`: direct preference optimisation from a fine-tuned model (engine/dpo.py)."""
from __future__ import annotations

import argparse

from engine.runner import run_stage


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check its inputs are this stage's, run it."""
    return run_stage("dpo", args)

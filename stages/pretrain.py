"""`apogee pretrain`: the pre-training stage, the engine's core loop with nothing added."""
from __future__ import annotations

import argparse

from engine.runner import run_stage


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check its inputs are this stage's, run it."""
    return run_stage("pretrain", args)

"""`apogee dpo`: direct preference optimisation from a fine-tuned model (engine/dpo.py)."""
from __future__ import annotations

import argparse

from engine.config import ConfigError, load_config
from engine.runner import exit_on_config_error, run_job


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set), check it is a preference run, run it."""
    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        if cfg.grpo.inputs:
            raise ConfigError(f"grpo.inputs={cfg.grpo.inputs}: prompts with answers are trained by `apogee grpo`")
        if not cfg.dpo.inputs:
            raise ConfigError("dpo.inputs=[]: `apogee dpo` needs JSONL files of preference pairs, e.g. "
                              "--set dpo.inputs=[pairs.jsonl] (lines {prompt, chosen, rejected})")
        return run_job(cfg, run_dir=args.run_dir, nproc=args.nproc, resume=args.resume)
    return exit_on_config_error(run)

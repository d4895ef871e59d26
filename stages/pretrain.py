"""`apogee pretrain`: the pre-training stage, the engine's core loop with nothing added."""
from __future__ import annotations

import argparse

from engine.config import ConfigError, load_config
from engine.runner import exit_on_config_error, run_job


def run_cli(args: argparse.Namespace) -> int:
    """Load the config (defaults <- --config <- --set) and run the job."""
    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        if cfg.sft.inputs:
            raise ConfigError(f"sft.inputs={cfg.sft.inputs}: fine-tuning examples are trained by `apogee sft`")
        if cfg.dpo.inputs:
            raise ConfigError(f"dpo.inputs={cfg.dpo.inputs}: preference pairs are trained by `apogee dpo`")
        if cfg.grpo.inputs:
            raise ConfigError(f"grpo.inputs={cfg.grpo.inputs}: prompts with answers are trained by `apogee grpo`")
        return run_job(cfg, run_dir=args.run_dir, nproc=args.nproc, resume=args.resume)
    return exit_on_config_error(run)

"""`apogee midtrain`: mid-training branches of a pre-training run.

Three things users do between pre-training and post-training, each a pre-training run that
starts from another one:
- the annealing (cooldown) branch of a WSD run: `midtrain.branch_from` names a checkpoint of the
  stable phase; the branch continues with its whole state (weights, optimizer moments, step and
  data position, so its first step is the main run's next step bit for bit) in its own run
  directory and, with optim.schedule=wsd, decays from that step (optim.wsd_decay_start);
- long-context extension: `train.init_from` with a longer model.seq_length and
  model.rope_scaling (Llama 3's frequency scaling): only the weights carry over;
- a new domain mix with replay of the pre-training data: data.inputs with data.weights (or
  data.phases), on either start.
A restarted branch resumes from its own newest checkpoint, not from the branch point again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.checkpoint_store import read_manifest, verify
from engine.config import ConfigError, load_config
from engine.resume import checkpoint_store
from engine.runner import exit_on_config_error, resolve_run_dir, run_job


def run_cli(args: argparse.Namespace) -> int:
    """Load the config, check it starts from another run, choose the start, run it."""
    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        branch, init = cfg.midtrain.branch_from, cfg.train.init_from
        if bool(branch) == bool(init):
            raise ConfigError(f"midtrain.branch_from={branch!r}, train.init_from={init!r}: `apogee midtrain` starts "
                              f"from one pre-trained run: set exactly one (branch_from keeps the optimizer and step, "
                              f"init_from only the weights)")
        resume = args.resume
        if branch:
            path = Path(branch)
            problem = verify(path) if path.is_dir() else "no such directory"
            if problem is not None:
                raise ConfigError(f"midtrain.branch_from={branch!r}: not an intact checkpoint ({problem})")
            cfg.checkpoint.allow_other_run = True
            if cfg.optim.schedule == "wsd" and cfg.optim.wsd_decay_start is None:
                cfg.optim.wsd_decay_start = int(read_manifest(path)["step"])
            # The branch point on the first start; the branch's own checkpoints after that.
            if resume == "auto" and not checkpoint_store(cfg, resolve_run_dir(cfg, args.run_dir)).published():
                resume = str(path)
        return run_job(cfg, run_dir=args.run_dir, nproc=args.nproc, resume=resume)

    return exit_on_config_error(run)

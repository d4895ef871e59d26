"""`apogee midtrain`: mid-training branches of a pre-training run.

Three things users do between pre-training and post-training, each a pre-training run that
starts from another one:
- the annealing (cooldown) branch of a WSD run: `midtrain.branch_from` names a checkpoint of the
  stable phase (or a run's checkpoints/ folder: its newest intact one); the branch continues with
  its whole state (weights, optimizer moments, step and data position, so its first step is the
  main run's next step bit for bit) in its own run directory and, with optim.schedule=wsd, decays
  from that step (optim.wsd_decay_start);
- long-context extension: `train.init_from` with a longer model.seq_length and
  model.rope_scaling (Llama 3's frequency scaling): only the weights carry over;
- a new domain mix with replay of the pre-training data: data.inputs with data.weights (or
  data.phases), on either start.
A restarted branch resumes from its own newest checkpoint, not from the branch point again.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from engine.config import ApogeeConfig, ConfigError
from engine.stage import Stage, steps_from_epochs
from engine.state.checkpoint_store import read_manifest, resolve_checkpoint


@dataclass
class MidtrainConfig:
    """Mid-training (`apogee midtrain`): where a branch of a pre-training run starts."""

    branch_from: Optional[str] = None
    """A checkpoint of another run to continue with its whole state (weights, optimizer, step, data
    position): the annealing branch of a WSD run; a step_* directory, or a run's checkpoints/ folder
    (its newest intact checkpoint). With optim.schedule=wsd the decay starts at the checkpoint's
    step unless optim.wsd_decay_start says otherwise. For new weights only (a longer context,
    another model config's run) use train.init_from instead."""


class MidtrainStage(Stage):
    """Pre-training continued from another run: a branch (whole state) or new weights only."""

    name = "midtrain"
    help = ("branch a pre-training run: WSD cooldown (midtrain.branch_from), long context, "
            "new data mix (train.init_from)")
    sections = MappingProxyType({"midtrain": MidtrainConfig})

    def claim(self, sections) -> Optional[str]:
        """A branch point is only acted on by `apogee midtrain`."""
        branch = sections["midtrain"].branch_from if "midtrain" in sections else None
        return f"midtrain.branch_from={branch!r}: a branch is started by `apogee midtrain`" if branch else None

    def prepare(self, cfg: ApogeeConfig, run_dir: Optional[str], resume: str) -> str:
        """Check the run starts from one pre-trained run; a branch starts from its checkpoint (the
        first time) with the decay at its step, and then from the branch's own checkpoints."""
        from engine.job.runner import resolve_run_dir
        from engine.state.resume import checkpoint_store

        steps_from_epochs(cfg, self)  # refuses train.epochs: the blend's length is train.steps
        branch, init = cfg.midtrain.branch_from, cfg.train.init_from
        if bool(branch) == bool(init):
            raise ConfigError(f"midtrain.branch_from={branch!r}, train.init_from={init!r}: `apogee midtrain` starts "
                              f"from one pre-trained run: set exactly one (branch_from keeps the optimizer and step, "
                              f"init_from only the weights)")
        if not branch:
            return resume
        path = resolve_checkpoint(branch, "midtrain.branch_from")
        cfg.checkpoint.allow_other_run = True
        if cfg.optim.schedule == "wsd" and cfg.optim.wsd_decay_start is None:
            cfg.optim.wsd_decay_start = int(read_manifest(path)["step"])
        # The branch point on the first start; the branch's own checkpoints after that.
        if resume == "auto" and not checkpoint_store(cfg, resolve_run_dir(cfg, run_dir)).published():
            return str(path)
        return resume

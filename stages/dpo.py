"""Direct preference optimisation (Rafailov et al. 2023) on the engine's parallel model.

Each preference pair is a prompt with a chosen and a rejected response. A microbatch holds the
chosen sequences of mbs pairs, then their rejected sequences (tokens [2 mbs, seq+1] and loss
masks over the responses, data_pipeline/preference.py). With log p(y | x) summed over a
response's tokens under the policy and under the frozen reference model (the policy's starting
weights), a pair's loss is

    -log sigmoid(beta * ((log p_c - log ref_c) - (log p_r - log ref_r)))

and the step's loss is the mean over the global batch's pairs (each rank divides its sum by the
global pair count, so the data-parallel sum of gradients is the mean's). Reward accuracy (the
fraction of pairs whose implicit reward prefers the chosen response) is logged with the loss.

The reference model is a second copy of this rank's chunk, built like the policy and never
trained; it starts equal to the policy (from train.init_from when set, else from the seed), and a
resumed run rebuilds it the same way. Tensor and data parallelism work as in pre-training;
pipeline and context parallelism are refused (the pair's log-probabilities would have to be
gathered across stages or sequence chunks before the sigmoid).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

import torch
import torch.nn.functional as F

from engine.config import ApogeeConfig, ConfigError
from engine.stage import Stage
from engine.train.trainer import Trainer
from parallel.collectives import all_reduce


@dataclass
class DPOConfig:
    """Direct preference optimisation (`apogee dpo`, stages/dpo.py)."""

    inputs: list = field(default_factory=list)
    """JSONL files of preference pairs, one per line: {prompt, chosen, rejected}."""
    beta: float = 0.1
    """Strength of the implicit KL penalty towards the reference model."""
    valid_inputs: list = field(default_factory=list)
    """Held-out pairs (same format) for train.eval_interval's passes: val_loss (the DPO loss) and
    val_reward_accuracy."""


class DPOStage(Stage):
    """Preference pairs trained with the DPO loss against a frozen reference (DPOTrainer)."""

    name = "dpo"
    help = "direct preference optimisation on {prompt, chosen, rejected} pairs (dpo.* keys)"
    sections = MappingProxyType({"dpo": DPOConfig})
    inputs_key = "dpo.inputs"
    inputs_what = "preference pairs"
    inputs_needs = ("JSONL files of preference pairs, e.g. --set dpo.inputs=[pairs.jsonl] "
                    "(lines {prompt, chosen, rejected})")
    default_config = "configs/dpo.yaml"
    """The dpo preset, used without --config (its comments document each value)."""
    section = "dpo"
    """The config section with `inputs` and `beta` (a stage with another preference loss names its own)."""

    def validate(self, cfg: ApogeeConfig, world_size: int) -> None:
        """pp = cp = 1 (a pair's log-probabilities must be whole), no fp8, beta > 0."""
        p = cfg.parallel
        if p.pp > 1 or p.cp > 1:
            key, value = ("parallel.pp", p.pp) if p.pp > 1 else ("parallel.cp", p.cp)
            raise ConfigError(f"{key}={value!r}: DPO runs with pp=1 and cp=1 (a pair's log-probabilities must be "
                              f"whole before the sigmoid); use tp and dp")
        if cfg.precision.dtype == "fp8":
            raise ConfigError("precision.dtype='fp8': DPO runs in bf16 or fp32 (the reference model would share the "
                              "policy's fp8 scales)")
        beta = getattr(cfg, self.section).beta
        if not beta > 0:
            raise ConfigError(f"{self.section}.beta={beta!r}: must be > 0")

    def build_data(self, cfg: ApogeeConfig):
        """Chosen and rejected sides of each pair, SFT-style masked (data_pipeline/preference.py)."""
        from data_pipeline.preference import PreferenceData, read_pairs
        from data_pipeline.tokenizer import get_tokenizer

        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        notes: list = []
        chosen, rejected = read_pairs(getattr(cfg, self.section).inputs, tokenizer, key=self.inputs_key,
                                      seq_length=cfg.model.seq_length, notes=notes)
        return PreferenceData(chosen, rejected, cfg.model.seq_length, cfg.seed, t.global_batch_size,
                              t.micro_batch_size, tokenizer.pad_id, notes=notes)

    def build_validation_data(self, cfg: ApogeeConfig):
        """Held-out pairs (<section>.valid_inputs), paired like the training data."""
        from data_pipeline.preference import PreferenceData, read_pairs
        from data_pipeline.tokenizer import get_tokenizer

        inputs, key = getattr(cfg, self.section).valid_inputs, f"{self.section}.valid_inputs"
        if not inputs:
            raise ConfigError(f"train.eval_interval={cfg.train.eval_interval}: `apogee {self.name}` validates on "
                              f"held-out pairs: set {key}=[valid.jsonl]")
        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        chosen, rejected = read_pairs(inputs, tokenizer, key=key)
        return PreferenceData(chosen, rejected, cfg.model.seq_length, cfg.seed, t.global_batch_size,
                              t.micro_batch_size, tokenizer.pad_id)

    def trainer_class(self, cfg: ApogeeConfig) -> type:
        """The DPO objective on the engine's Trainer."""
        return DPOTrainer


class DPOTrainer(Trainer):
    """A Trainer whose step is DPO over (chosen, rejected) microbatches; see the module doc. Another
    preference objective (IPO, ...) overrides `pair_loss` (and names its config `section`)."""

    section = "dpo"
    """The config section holding beta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = getattr(self.cfg, self.section).beta
        self.reference = self.frozen_reference()
        self.last_accuracy: Optional[float] = None

    def sequence_logps(self, model, inputs, targets, positions, loss_mask) -> torch.Tensor:
        """Summed log-probability of each row's masked-in targets under `model`: [rows] fp32."""
        logits = model(inputs, positions=positions)
        return -torch.stack([self.loss_fn(logits[i:i + 1], targets[i:i + 1], loss_mask[i:i + 1])[0]
                             for i in range(logits.shape[0])])

    def loss_divisor(self, microbatches: list) -> int:
        """The global number of preference pairs in the step."""
        return self.cfg.train.global_batch_size

    def forward_backward(self, microbatches: list) -> torch.Tensor:
        """DPO forward and backward over this rank's microbatches; returns the local loss sum."""
        loss_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        correct = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for j, microbatch in enumerate(microbatches):
            inputs, targets, positions, loss_mask = self.prepare_microbatch(microbatch)
            self.grads.is_last_microbatch = j == len(microbatches) - 1
            with torch.no_grad():
                ref = self.sequence_logps(self.reference[0], inputs, targets, positions, loss_mask)
            policy = self.sequence_logps(self.model, inputs, targets, positions, loss_mask)
            pairs = policy.shape[0] // 2
            log_ratios = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
            loss_sum = self.pair_loss(log_ratios).sum()
            (loss_sum / self.step_tokens).backward()
            loss_total += loss_sum.detach()
            correct += (log_ratios.detach() > 0).float().sum()
        all_reduce(correct, self.dp, purpose="metrics")
        self.last_accuracy = correct.item() / self.cfg.train.global_batch_size
        return loss_total

    def validation_sums(self, microbatches: list) -> torch.Tensor:
        """[pair-loss sum, pairs, pairs whose implicit reward prefers the chosen response] (no gradient)."""
        sums = torch.zeros(3, dtype=torch.float64)
        for microbatch in microbatches:
            inputs, targets, positions, loss_mask = self.prepare_microbatch(microbatch)
            ref = self.sequence_logps(self.reference[0], inputs, targets, positions, loss_mask)
            policy = self.sequence_logps(self.model, inputs, targets, positions, loss_mask)
            pairs = policy.shape[0] // 2
            log_ratios = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
            sums += torch.tensor([float(self.pair_loss(log_ratios).sum()), pairs, float((log_ratios > 0).sum())],
                                 dtype=torch.float64)
        return sums

    def validation_metrics(self, sums: torch.Tensor) -> dict:
        """val_loss (the mean pair loss) and val_reward_accuracy."""
        pairs = max(1.0, float(sums[1]))
        return {"val_loss": float(sums[0]) / pairs, "val_reward_accuracy": float(sums[2]) / pairs}

    def pair_loss(self, log_ratios: torch.Tensor) -> torch.Tensor:
        """Each pair's loss from h = (log p_c - log ref_c) - (log p_r - log ref_r): -log sigmoid(beta h)."""
        return F.softplus(-(self.beta * log_ratios))

    def train_step(self, step: int, microbatches=None):
        """A DPO step; its result carries the reward accuracy."""
        result = super().train_step(step, microbatches)
        result.extra["reward_accuracy"] = self.last_accuracy
        return result


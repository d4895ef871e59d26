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
resumed run rebuilds it the same way. Tensor, data and context parallelism work as in
pre-training: under CP each rank sums its own tokens' log-probabilities and one all-reduce over
the cp group (Megatron's g: identity in backward) makes the pairs whole on every CP rank, whose
sums the step then counts once (CP rank 0). Pipeline parallelism is refused (the pair loss needs
both models' log-probabilities on one stage).

With dpo.packing a microbatch is instead rows of several pairs (data_pipeline/packing.py), each
row's sequences chosen, rejected, chosen, ... as documents 0, 1, 2, ...; each sequence's log p is
its document's masked targets summed, so a pair's log-ratio is what it is unpacked, and the step
still divides by the global number of pairs (counted over the dp ranks).
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
from parallel.context_parallel import split_for_context_parallel
from parallel.mappings import reduce_from_tp_region


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
    packing: bool = False
    """Both sides of several pairs per sample by best-fit decreasing, each sequence attending only to
    itself with its own positions (data_pipeline/packing.py); train.global_batch_size then counts
    packed samples, and the loss still averages over the step's pairs."""


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
        """pp = 1 (the pair loss needs both models' whole log-probabilities on one stage), no fp8, beta > 0."""
        p = cfg.parallel
        if p.pp > 1:
            raise ConfigError(f"parallel.pp={p.pp!r}: DPO runs with pp=1 (the policy and its frozen reference "
                              f"score each pair on one stage); use tp, cp and dp")
        if cfg.precision.dtype == "fp8":
            raise ConfigError("precision.dtype='fp8': DPO runs in bf16 or fp32 (the reference model would share the "
                              "policy's fp8 scales)")
        beta = getattr(cfg, self.section).beta
        if not beta > 0:
            raise ConfigError(f"{self.section}.beta={beta!r}: must be > 0")

    def build_data(self, cfg: ApogeeConfig):
        """Chosen and rejected sides of each pair, SFT-style masked (data_pipeline/preference.py)."""
        from data_pipeline.preference import read_pairs
        from data_pipeline.tokenizer import get_tokenizer

        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        notes: list = []
        chosen, rejected = read_pairs(getattr(cfg, self.section).inputs, tokenizer, key=self.inputs_key,
                                      seq_length=cfg.model.seq_length, notes=notes)
        return self.data_class(cfg)(chosen, rejected, cfg.model.seq_length, cfg.seed, t.global_batch_size,
                              t.micro_batch_size, tokenizer.pad_id, notes=notes)

    def build_validation_data(self, cfg: ApogeeConfig):
        """Held-out pairs (<section>.valid_inputs), paired like the training data."""
        from data_pipeline.preference import read_pairs
        from data_pipeline.tokenizer import get_tokenizer

        inputs, key = getattr(cfg, self.section).valid_inputs, f"{self.section}.valid_inputs"
        if not inputs:
            raise ConfigError(f"train.eval_interval={cfg.train.eval_interval}: `apogee {self.name}` validates on "
                              f"held-out pairs: set {key}=[valid.jsonl]")
        tokenizer, t = get_tokenizer(cfg.data.tokenizer), cfg.train
        chosen, rejected = read_pairs(inputs, tokenizer, key=key)
        return self.data_class(cfg)(chosen, rejected, cfg.model.seq_length, cfg.seed, t.global_batch_size,
                              t.micro_batch_size, tokenizer.pad_id)

    def samples_per_epoch(self, cfg: ApogeeConfig, examples: int) -> int:
        """Packed: the rows an epoch's pairs fill (the pairs are read to know their lengths)."""
        packing = getattr(getattr(cfg, self.section), "packing", False)
        return self.build_data(cfg).rows.rows_per_epoch if packing else examples

    def data_class(self, cfg: ApogeeConfig) -> type:
        """Pairs as 2 padded rows each, or packed rows (<section>.packing)."""
        if getattr(getattr(cfg, self.section), "packing", False):
            from data_pipeline.packing import PackedPreferenceData
            return PackedPreferenceData
        from data_pipeline.preference import PreferenceData
        return PreferenceData

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

    def sequence_logps(self, model, inputs, targets, positions, loss_mask, documents=None) -> torch.Tensor:
        """Summed log-probability of each row's masked-in targets under `model`: [rows] fp32. With
        `documents` (packed rows), of each sequence instead: [sequences] over the rows in order."""
        logits = model(inputs, positions=positions, documents=documents)
        if documents is None:
            logps = -torch.stack([self.loss_fn(logits[i:i + 1], targets[i:i + 1], loss_mask[i:i + 1])[0]
                                  for i in range(logits.shape[0])])
        else:
            # A target's sequence is its input's document (a target starting the next one is masked
            # out); under CP this rank's targets are its zigzag chunks, so are their documents.
            local = split_for_context_parallel(documents, 1, self.cp.rank, self.cp.size)
            logps = -torch.stack([self.loss_fn(logits[i:i + 1], targets[i:i + 1],
                                               loss_mask[i:i + 1] * (local[i:i + 1] == d))[0]
                                  for i in range(logits.shape[0]) for d in range(int(documents[i].max()) + 1)])
        # Under CP each rank summed its own tokens' share: Megatron's g (sum forward, identity backward)
        # makes every CP rank hold whole sequences, and its gradient is its tokens' part of the pair loss's.
        return reduce_from_tp_region(logps, self.cp)

    def loss_divisor(self, microbatches: list) -> int:
        """The global number of preference pairs in the step (packed rows: summed over the dp ranks)."""
        if all(mb.document_ids is None for mb in microbatches):
            return self.cfg.train.global_batch_size
        count = torch.tensor(float(sum(_pairs_in(mb) for mb in microbatches)), device=self.ctx.device)
        all_reduce(count, self.dp, purpose="metrics")
        return max(1, int(count.item()))

    def log_ratios(self, microbatch) -> torch.Tensor:
        """h = (log p_c - log ref_c) - (log p_r - log ref_r) of each of this microbatch's pairs (the
        policy's terms carry the gradient)."""
        inputs, targets, positions, loss_mask = self.prepare_microbatch(microbatch)
        documents = self.documents(microbatch)
        with torch.no_grad():
            ref = self.sequence_logps(self.reference[0], inputs, targets, positions, loss_mask, documents)
        policy = self.sequence_logps(self.model, inputs, targets, positions, loss_mask, documents)
        return _pair_log_ratios(policy, ref, documents is not None)

    def forward_backward(self, microbatches: list) -> torch.Tensor:
        """DPO forward and backward over this rank's microbatches; returns the local loss sum."""
        loss_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        correct = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for j, microbatch in enumerate(microbatches):
            self.grads.is_last_microbatch = j == len(microbatches) - 1
            log_ratios = self.log_ratios(microbatch)
            loss_sum = self.pair_loss(log_ratios).sum()
            (loss_sum / self.step_tokens).backward()
            loss_total += loss_sum.detach()
            correct += (log_ratios.detach() > 0).float().sum()
        all_reduce(correct, self.dp, purpose="metrics")
        self.last_accuracy = correct.item() / self.step_tokens
        return loss_total * self.counts_pairs  # summed over dp x cp by the caller

    def validation_sums(self, microbatches: list) -> torch.Tensor:
        """[pair-loss sum, pairs, pairs whose implicit reward prefers the chosen response] (no gradient)."""
        sums = torch.zeros(3, dtype=torch.float64)
        for microbatch in microbatches:
            log_ratios = self.log_ratios(microbatch)
            sums += torch.tensor([float(self.pair_loss(log_ratios).sum()), log_ratios.numel(),
                                  float((log_ratios > 0).sum())], dtype=torch.float64)
        return sums * self.counts_pairs  # summed over dp x cp by the caller

    @property
    def counts_pairs(self) -> float:
        """1 on CP rank 0, else 0: every CP rank holds the same whole pairs, whose sums count once."""
        return 1.0 if self.cp.rank == 0 else 0.0

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



def _pairs_in(microbatch) -> int:
    """Pairs of a packed microbatch: each row holds documents 0 .. 2k-1 (chosen, rejected per pair)."""
    return sum((int(row.max()) + 1) // 2 for row in microbatch.document_ids)


def _pair_log_ratios(policy: torch.Tensor, ref: torch.Tensor, packed: bool) -> torch.Tensor:
    """Each pair's (log p_c - log ref_c) - (log p_r - log ref_r) from per-sequence log-probabilities:
    rows [chosen..., rejected...] unpacked; sequences chosen, rejected, chosen, ... packed (a pair
    never straddles rows, so the flat order alternates)."""
    if packed:
        chosen, rejected = slice(0, None, 2), slice(1, None, 2)
    else:
        pairs = policy.shape[0] // 2
        chosen, rejected = slice(0, pairs), slice(pairs, None)
    return (policy[chosen] - ref[chosen]) - (policy[rejected] - ref[rejected])

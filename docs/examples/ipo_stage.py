"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences") as a stage that lives outside Apogee: the worked example of docs/ARCHITECTURE.md.

Run it like a built-in stage, naming it by module and class:

    apogee run docs.examples.ipo_stage:IPOStage --set ipo.inputs=[pairs.jsonl] train.init_from=runs/sft

IPO keeps DPO's data, reference model and log-ratio h = (log p_c - log ref_c) - (log p_r - log ref_r)
and replaces -log sigmoid(beta h) by the squared loss (h - 1 / (2 tau))^2, which does not push h to
infinity on deterministic preferences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from stages.dpo import DPOStage, DPOTrainer


@dataclass
class IPOConfig:
    """Identity preference optimisation (`apogee run ...:IPOStage`)."""

    inputs: list = field(default_factory=list)
    """JSONL files of preference pairs, one per line: {prompt, chosen, rejected}."""
    beta: float = 0.1
    """IPO's tau: the target log-ratio margin is 1 / (2 tau)."""


class IPOTrainer(DPOTrainer):
    """DPO's step with IPO's per-pair loss."""

    section = "ipo"

    def pair_loss(self, log_ratios):
        """(h - 1 / (2 tau))^2 for each pair."""
        return (log_ratios - 1 / (2 * self.beta)) ** 2


class IPOStage(DPOStage):
    """Preference pairs trained with IPO against a frozen reference."""

    name = "ipo"
    help = "identity preference optimisation on {prompt, chosen, rejected} pairs (ipo.* keys)"
    sections = MappingProxyType({"ipo": IPOConfig})
    section = "ipo"
    inputs_key = "ipo.inputs"
    inputs_needs = "JSONL files of preference pairs, e.g. --set ipo.inputs=[pairs.jsonl]"

    def trainer_class(self, cfg):
        """IPO's trainer."""
        return IPOTrainer

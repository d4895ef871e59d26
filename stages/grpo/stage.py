"""The GRPO stage: its config section (`grpo.*`), its rules, its data (prompts with answers) and trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from engine.config import ApogeeConfig, ConfigError
from engine.config_validation import require
from engine.stage import Stage


@dataclass
class GRPOConfig:
    """Group relative policy optimisation with verifiable rewards (`apogee grpo`, stages/grpo/trainer.py)."""

    inputs: list = field(default_factory=list)
    """JSONL files of prompts with verifiable answers, one per line: {prompt, answer}."""
    group_size: int = 8
    """Completions sampled per prompt; advantages are relative to the prompt's group (>= 2)."""
    max_new_tokens: int = 32
    """Longest completion in tokens (sampling also stops at the tokenizer's EOS); prompt
    plus completion must fit model.seq_length."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; 0 samples greedily."""
    reward: str = "exact_match"
    """exact_match, contains, or 'package.module:function' taking (completion, answer) -> float."""
    clip: float = 0.2
    """PPO clipping range epsilon of the probability ratio."""
    kl_coeff: float = 0.04
    """Weight of the k3 KL estimate towards the frozen reference model (0 drops it)."""
    valid_inputs: list = field(default_factory=list)
    """Held-out {prompt, answer} lines for train.eval_interval's passes: one greedy completion per
    prompt, val_reward_mean and val_accuracy."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by its std + 1e-4 (false: Dr. GRPO's unscaled advantages)."""


class GRPOStage(Stage):
    """Rollouts of the policy scored by a verifiable reward, trained with GRPO (stages/grpo/trainer.py)."""

    name = "grpo"
    help = "GRPO with verifiable rewards on {prompt, answer} prompts (grpo.* keys)"
    sections = MappingProxyType({"grpo": GRPOConfig})
    inputs_key = "grpo.inputs"
    inputs_what = "prompts with answers"
    inputs_needs = ("JSONL files of prompts with verifiable answers, e.g. --set grpo.inputs=[prompts.jsonl] "
                    "(lines {prompt, answer})")
    default_config = "configs/grpo.yaml"
    """The grpo preset, used without --config (its comments document each value)."""

    def validate(self, cfg: ApogeeConfig, world_size: int) -> None:
        """The rules of a GRPO run: its layout, precision and rollout settings."""
        from engine.rewards import reward_function

        g, p, m = cfg.grpo, cfg.parallel, cfg.model
        require(p.pp == 1 and p.cp == 1, "parallel.pp" if p.pp > 1 else "parallel.cp", max(p.pp, p.cp),
                 "GRPO runs with pp=1 and cp=1 (rollouts sample from whole logits of whole sequences); use tp and dp")
        require(cfg.precision.dtype != "fp8", "precision.dtype", "fp8", "GRPO runs in bf16 or fp32 (the "
                 "reference model would share the policy's fp8 scales)")
        require(m.z_loss_weight == 0, "model.z_loss_weight", m.z_loss_weight,
                 "GRPO needs 0: its per-token log-probabilities come from the cross-entropy")
        require(g.group_size >= 2, "grpo.group_size", g.group_size, "must be >= 2 (advantages are relative to the group)")
        require(1 <= g.max_new_tokens < m.seq_length, "grpo.max_new_tokens", g.max_new_tokens,
                 f"must be in 1..model.seq_length-1 = {m.seq_length - 1} (prompt and completion share a sample)")
        require(g.temperature >= 0, "grpo.temperature", g.temperature, "must be >= 0 (0 samples greedily)")
        require(g.clip > 0, "grpo.clip", g.clip, "must be > 0")
        require(g.kl_coeff >= 0, "grpo.kl_coeff", g.kl_coeff, "must be >= 0 (0 drops the KL term)")
        garbage = [fault for fault in cfg.resilience.inject if str(fault).startswith("garbage_batch")]
        require(not garbage, "resilience.inject", garbage, "GRPO samples its batches from the policy: "
                 "rehearse other faults (kill, raise, hang, bitflip)")
        try:
            reward_function(g.reward)
        except ValueError as error:
            raise ConfigError(f"grpo.reward={g.reward!r}: {error}") from None

    def build_data(self, cfg: ApogeeConfig):
        """Prompts with answers, addressed like SFT examples (data_pipeline/prompts.py); the reward is
        called once on the first answer and an empty completion, and must return a number."""
        from data_pipeline.prompts import PromptData, read_prompts
        from data_pipeline.tokenizer import get_tokenizer

        from engine.rewards import check_reward, reward_function

        t = cfg.train
        prompts = read_prompts(cfg.grpo.inputs, get_tokenizer(cfg.data.tokenizer),
                               cfg.model.seq_length - cfg.grpo.max_new_tokens, key=self.inputs_key,
                               limit="model.seq_length - grpo.max_new_tokens")
        try:  # once, on the first prompt's answer: a wrong signature fails here, not at step 1
            check_reward(reward_function(cfg.grpo.reward), cfg.grpo.reward, prompts[0][1])
        except ValueError as error:
            raise ConfigError(f"grpo.reward={cfg.grpo.reward!r}: {error}") from None
        return PromptData(prompts, cfg.seed, t.global_batch_size, t.micro_batch_size)

    def build_validation_data(self, cfg: ApogeeConfig):
        """Held-out prompts (grpo.valid_inputs), addressed like the training prompts."""
        from data_pipeline.prompts import PromptData, read_prompts
        from data_pipeline.tokenizer import get_tokenizer

        if not cfg.grpo.valid_inputs:
            raise ConfigError(f"train.eval_interval={cfg.train.eval_interval}: `apogee grpo` validates on held-out "
                              f"prompts: set grpo.valid_inputs=[valid.jsonl]")
        t = cfg.train
        prompts = read_prompts(cfg.grpo.valid_inputs, get_tokenizer(cfg.data.tokenizer),
                               cfg.model.seq_length - cfg.grpo.max_new_tokens, key="grpo.valid_inputs",
                               limit="model.seq_length - grpo.max_new_tokens")
        return PromptData(prompts, cfg.seed, t.global_batch_size, t.micro_batch_size)

    def trainer_class(self, cfg: ApogeeConfig) -> type:
        """Rollouts and the clipped policy gradient on the engine's Trainer."""
        from stages.grpo.trainer import GRPOTrainer

        return GRPOTrainer

"""GRPO's objective: group-relative advantages, the PPO-clipped policy loss, the k3 KL estimate,
and the step guard's rule for a policy-gradient loss (see stages/grpo/trainer.py for the step)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from engine.resilience.spikes import SpikeDetector

ADVANTAGE_EPS = 1e-4
"""Added to a group's reward std before dividing (DeepSeekMath, TRL)."""


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """[groups, G] rewards -> advantages: centred on the group mean, divided by std + 1e-4 if `scale`."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + ADVANTAGE_EPS) if scale else centred


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> torch.Tensor:
    """Per-token PPO-clipped policy-gradient loss -min(rho A, clip(rho, 1 - clip, 1 + clip) A)."""
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(q) - q - 1 with q = log ref - log pi (>= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


class PolicyGradientAnomalyDetector(SpikeDetector):
    """NaN/Inf only. A policy-gradient loss centres on zero and changes sign, and the gradient
    vanishes whenever every group's rewards tie (common early in RLVR), so neither the loss nor
    the grad norm is judged against a running median: the first rewarded batch is no spike."""

    def judge(self, loss: float, grad_norm: float) -> Optional[str]:
        """None for finite values, else which one is not finite."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        return None

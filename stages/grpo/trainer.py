"""Group relative policy optimisation with verifiable rewards (GRPO / RLVR; Shao et al. 2024,
DeepSeekMath; DeepSeek-R1) on the engine's parallel model.

A step's data is prompts with answers (data_pipeline/prompts.py). For each prompt the current
policy samples `grpo.group_size` completions of up to `grpo.max_new_tokens` tokens (stopping at
the tokenizer's EOS, data_pipeline/tokenizer.py), a reward function scores each decoded completion against the answer, and each completion's
advantage is its reward relative to its group: A_i = (r_i - mean(r)) / (std(r) + 1e-4), with
torch's (Bessel-corrected) std as TRL; `grpo.scale_rewards=false` drops the division. The loss of
completion token t under the policy pi, the rollout policy pi_old and the frozen reference is

    -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + kl_coeff * (exp(q_t) - q_t - 1),
    rho_t = pi(y_t) / pi_old(y_t),  q_t = log ref(y_t) - log pi(y_t)   (Schulman's k3 estimator),

and the step's loss is its sum over completion tokens divided by the global count of completion
tokens (Trainer.loss_divisor), so every layout computes the same mean. One update follows each
rollout batch, so pi_old is pi (rho = 1, detached) and the clip only shapes the gradient's form.

Rollouts are layout-invariant: completion c of the prompt at global position p draws its random
numbers from a generator seeded by (seed, step, p, c), and at tp > 1 the vocab-sharded logits of
the sampled positions are all-gathered over the TP group, so every TP rank samples the same token
and every data-parallel layout samples the same completions. Sampling is engine/eval/generate.py's
Generator (the one `apogee generate` uses): a KV cache, one prompt's group at a time (under
sequence parallelism, whose shards cannot hold one new token, it re-runs the sequence instead).
Pipeline and context parallelism are refused (sampling needs whole logits of whole sequences on
one rank).

Resilience: a step is still a pure function of (weights, step), so replays, audits and resumes
reproduce it. The step guard only flags a non-finite loss or grad norm: the loss changes sign and
the gradient vanishes whenever every group's rewards tie, so running-median spike rules would
fire on the first rewarded batch (PolicyGradientAnomalyDetector, stages/grpo/objective.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from data_pipeline.microbatch import Microbatch
from data_pipeline.prompts import Prompt
from data_pipeline.tokenizer import get_tokenizer
from engine.eval.generate import Generator
from engine.model.moe import set_aux_loss_scale
from engine.rewards import reward_function
from engine.train.metrics import flops_per_step
from engine.train.trainer import Trainer
from stages.grpo.objective import PolicyGradientAnomalyDetector, clipped_policy_loss, group_advantages, k3_kl
from parallel.collectives import all_reduce
from parallel.random import generator


class RolloutBatch(NamedTuple):
    """The sampled completions of a microbatch's prompts, group_size rows per prompt."""

    tokens: torch.Tensor
    """[rows, seq + 1] prompt + completion, padded."""
    loss_mask: torch.Tensor
    """[rows, seq]: 1 where target t + 1 is a completion token (EOS included)."""
    advantages: torch.Tensor
    """[rows] group-relative advantage of each completion."""
    rewards: torch.Tensor
    """[rows] reward of each completion."""
    completion_lengths: torch.Tensor
    """[rows] completion tokens (EOS included)."""


class GRPOTrainer(Trainer):
    """A Trainer whose microbatches are rollouts of the current policy and whose step is GRPO's
    clipped policy gradient with a KL penalty towards the starting weights; see the module doc."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        g, t = self.cfg.grpo, self.cfg.train
        self.tokenizer = get_tokenizer(self.cfg.data.tokenizer)
        self.reward = reward_function(g.reward)
        self.reference = self.frozen_reference()
        # A step trains group_size sequences per prompt: throughput and MoE scaling count them all.
        self.global_tokens = t.global_batch_size * g.group_size * self.cfg.model.seq_length
        self.step_flops = flops_per_step(self.cfg.model, t.global_batch_size * g.group_size)
        set_aux_loss_scale(self.chunks, self.global_tokens)
        self.local_stats = torch.zeros(5, device=self.ctx.device)  # rows, reward sum, correct, length sum, kl sum of the last step

    def policy_generator(self) -> Generator:
        """The current policy's sampler: KV cache, except under sequence parallelism (see the module doc)."""
        sp = self.cfg.parallel.sequence_parallel and self.tp.size > 1
        # Sampling stops at the tokenizer's declared EOS (what SFT trained responses to end with).
        return Generator(self.model, min(self.tokenizer.vocab_size, self.cfg.model.vocab_size), self.tokenizer.eos_id,
                         self.tp, use_cache=not sp, pad_multiple=self.tp.size if sp else 1,
                         pad_id=self.tokenizer.pad_id, device=self.ctx.device)

    def anomaly_detector(self, cfg) -> "PolicyGradientAnomalyDetector":
        """NaN/Inf only (see PolicyGradientAnomalyDetector): the step guard's rule for GRPO steps."""
        return PolicyGradientAnomalyDetector(cfg.spike_window, cfg.spike_factor, cfg.grad_spike_factor,
                                              cfg.spike_sigmas)

    def token_logps(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) per token [b, s] from this rank's logits (vocab-sharded at tp > 1).

        self.loss_fn returns sum_t w_t * CE_t for loss-mask weights w; its gradient with respect
        to w is the per-token cross-entropy, and built with create_graph that gradient is itself
        differentiable in the logits. So the vocab-parallel cross-entropy yields per-token
        log-probabilities at any tp without gathering the logits.
        """
        with torch.enable_grad():
            weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device, requires_grad=True)
            loss_sum, _ = self.loss_fn(logits, targets, weights)
            (cross_entropy,) = torch.autograd.grad(loss_sum, weights, create_graph=logits.requires_grad)
        return -cross_entropy

    def microbatches(self, step: int) -> list[RolloutBatch]:
        """This rank's prompts of `step`, each microbatch rolled out by the current policy."""
        return [self.rollout(step, prompts) for prompts in super().microbatches(step)]

    def rollout(self, step: int, prompts: list[Prompt]) -> RolloutBatch:
        """Sample group_size completions per prompt, score them and compute their advantages."""
        g, seq = self.cfg.grpo, self.cfg.model.seq_length
        rows = len(prompts) * g.group_size
        tokens = torch.full((rows, seq + 1), self.tokenizer.pad_id, dtype=torch.int64)
        starts = torch.tensor([len(p.tokens) for p in prompts for _ in range(g.group_size)])
        ends, sampler = starts.clone(), self.policy_generator()
        for i, prompt in enumerate(prompts):
            generators = [generator(self.cfg.seed, "grpo-rollout", step, prompt.position, c)
                          for c in range(g.group_size)]
            completions = sampler.generate(prompt.tokens, generators, g.max_new_tokens, g.temperature)
            for c, completion in enumerate(completions):
                row, start = i * g.group_size + c, len(prompt.tokens)
                tokens[row, :start] = torch.tensor(prompt.tokens)
                tokens[row, start:start + len(completion.ids)] = torch.tensor(completion.ids)
                ends[row] = start + len(completion.ids)
        loss_mask = torch.zeros(rows, seq)
        rewards = torch.zeros(rows)
        for row in range(rows):
            start, end = int(starts[row]), int(ends[row])
            loss_mask[row, start - 1:end - 1] = 1.0  # mask[t] trains target t + 1
            completion = tokens[row, start:end].tolist()
            text = self.tokenizer.decode(completion[:-1] if completion and completion[-1] == self.tokenizer.eos_id else completion)
            rewards[row] = float(self.reward(text, prompts[row // g.group_size].answer))
        advantages = group_advantages(rewards.view(-1, g.group_size), g.scale_rewards).view(-1)
        return RolloutBatch(tokens, loss_mask, advantages, rewards, ends - starts)

    def validation_sums(self, microbatches: list) -> torch.Tensor:
        """[reward sum, completions with reward 1, completions]: one greedy completion per held-out prompt."""
        g, sampler = self.cfg.grpo, self.policy_generator()
        sums = torch.zeros(3, dtype=torch.float64)
        for prompts in microbatches:
            for prompt in prompts:
                completion = sampler.generate(prompt.tokens, [None], g.max_new_tokens, temperature=0.0)[0]
                ids = completion.ids[:-1] if completion.finish == "eod" else completion.ids
                reward = float(self.reward(self.tokenizer.decode(ids), prompt.answer))
                sums += torch.tensor([reward, float(reward == 1), 1.0], dtype=torch.float64)
        return sums

    def validation_metrics(self, sums: torch.Tensor) -> dict:
        """val_reward_mean and val_accuracy (the share of completions with reward 1) of greedy decoding."""
        count = max(1.0, float(sums[2]))
        return {"val_reward_mean": float(sums[0]) / count, "val_accuracy": float(sums[1]) / count}

    def loss_divisor(self, microbatches: list[RolloutBatch]) -> int:
        """The step's global number of completion tokens."""
        return super().loss_divisor([Microbatch(batch.tokens, batch.loss_mask) for batch in microbatches])

    def forward_backward(self, microbatches: list[RolloutBatch]) -> torch.Tensor:
        """GRPO forward and backward over this rank's rollouts; returns the local loss sum."""
        g = self.cfg.grpo
        loss_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        kl_total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for j, batch in enumerate(microbatches):
            inputs, targets, positions, loss_mask = self.prepare_microbatch(Microbatch(batch.tokens, batch.loss_mask))
            self.grads.is_last_microbatch = j == len(microbatches) - 1
            completion = loss_mask > 0
            with torch.no_grad():
                ref_logits = self.reference[0](inputs, positions=positions)
            ref_logp = self.token_logps(ref_logits, targets).detach()
            logp = self.token_logps(self.model(inputs, positions=positions), targets)
            # Outside the completions (prompt, padding) the terms are zeroed before exp() can overflow.
            logp, ref_logp = logp.where(completion, 0.0), ref_logp.where(completion, 0.0)
            advantages = batch.advantages.to(self.ctx.device, torch.float32).unsqueeze(1)
            kl = k3_kl(logp, ref_logp)
            per_token = clipped_policy_loss(logp, logp.detach(), advantages, g.clip) + g.kl_coeff * kl
            loss_sum = (per_token * loss_mask).sum()
            (loss_sum / self.step_tokens).backward()
            loss_total += loss_sum.detach()
            kl_total += (kl.detach() * loss_mask).sum()
        rewards = torch.cat([batch.rewards for batch in microbatches])
        lengths = torch.cat([batch.completion_lengths for batch in microbatches])
        host = torch.stack([torch.tensor(float(rewards.numel())), rewards.sum(), (rewards == 1).sum().float(),
                            lengths.sum().float()])
        # Built on the device: the DP all-reduce takes it there, and the KL sum never leaves it.
        self.local_stats = torch.cat([host.to(self.ctx.device), kl_total.reshape(1)])
        return loss_total

    def train_step(self, step: int, microbatches: Optional[list[RolloutBatch]] = None):
        """A GRPO step; its result carries reward_mean, accuracy, completion_length and kl."""
        result = super().train_step(step, microbatches)
        stats = self.local_stats.clone()
        all_reduce(stats, self.dp, purpose="metrics")  # TP ranks hold copies of their DP rank's rollouts
        completions, reward_sum, correct, length_sum, kl_sum = stats.tolist()
        result.extra.update(reward_mean=reward_sum / completions, accuracy=correct / completions,
                            completion_length=length_sum / completions, kl=kl_sum / self.step_tokens)
        return result

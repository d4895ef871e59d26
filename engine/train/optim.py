"""AdamW with fp32 master weights, global-norm clipping, and learning-rate schedules.

Schedules (`lr_at`): linear warmup, then cosine to min_lr, WSD (warmup-stable-decay) or constant.
The optimizer (`MasterWeightOptimizer`) steps fp32 masters of bf16 parameters and copies the
result back; fp32 parameters are stepped in place. Gradients come from `param.main_grad` (the
data-parallel module's fp32 accumulation buffer) when present, else `param.grad`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from engine.config import OptimConfig


def _warmup(step: int, cfg: OptimConfig) -> float:
    # (step + 1) / warmup: the first step already moves, and step warmup-1 runs at the peak.
    return cfg.lr * (step + 1) / cfg.warmup_steps


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of 0-based optimizer step `step` of a `total_steps` run.

    Steps 0..warmup_steps-1 rise linearly: lr * (step + 1) / warmup_steps. Then:
    - cosine: min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2 with t = (step - warmup) / decay_steps
      (decay_steps defaults to total_steps - warmup_steps), min_lr from then on;
    - wsd: lr until wsd_decay_start (default int(0.8 * total_steps)), then decay to min_lr at
      total_steps with t = (step - start) / (total - start), shaped by wsd_decay_style:
      linear 1 - t, cosine (1 + cos(pi t)) / 2, sqrt 1 - sqrt(t); setting the start lets a run
      branch its decay off any point of the stable phase;
    - constant: lr.
    """
    if step < cfg.warmup_steps:
        return _warmup(step, cfg)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps - cfg.warmup_steps
        t = 1.0 if decay_steps <= 0 else min(1.0, (step - cfg.warmup_steps) / decay_steps)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "wsd":
        start = cfg.wsd_decay_start if cfg.wsd_decay_start is not None else int(0.8 * total_steps)
        if step < start:
            return cfg.lr
        t = 1.0 if total_steps <= start else min(1.0, (step - start) / (total_steps - start))
        if cfg.wsd_decay_style == "linear":
            factor = 1.0 - t
        elif cfg.wsd_decay_style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        elif cfg.wsd_decay_style == "sqrt":
            factor = 1.0 - math.sqrt(t)
        else:
            raise ValueError(f"optim.wsd_decay_style={cfg.wsd_decay_style!r}: expected linear, cosine or sqrt")
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected cosine, wsd or constant")


def _adamw(groups: list, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW, fused (one kernel over all tensors; CPU-supported in torch 2.13) when possible."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class MasterWeightOptimizer:
    """AdamW over fp32 masters with global-norm clipping; `step(lr)` returns the grad norm.

    Parameters with ndim < 2 (norm weights, biases) get no weight decay; matrices (including
    the embedding) do. A non-fp32 parameter gets an fp32 master copy that AdamW updates and
    that is then copied (rounded) into the parameter, so small updates accumulate in the master.
    Masters are copied from the parameters at construction: build the optimizer after the weights
    are final, or call `sync_masters_from_params()` after loading weights into the model.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig,
                 counts_in_norm: Optional[Callable[[str, nn.Parameter], bool]] = None,
                 device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device  # of the norm's collectives: a rank with no gradient to count still joins them
        # Parallel layouts hold some parameters on several ranks (TP-replicated norms, tied
        # embeddings on two pipeline stages): only one copy may count in the global grad norm.
        self.counts_in_norm = counts_in_norm or (lambda name, p: True)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[Tensor] = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            self.names.append(name)
            self.params.append(p)
            self.masters.append(p if p.dtype == torch.float32 else p.detach().float())
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = _adamw(groups, cfg)

    @property
    def master_params(self) -> dict[str, Tensor]:
        """name -> fp32 tensor that the optimizer updates (the parameter itself when fp32)."""
        return dict(zip(self.names, self.masters))

    def _gather_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """Point each master's .grad at its fp32 gradient; return (all grads, grads counted in the norm)."""
        grads, norm_grads = [], []
        for name, p, master in zip(self.names, self.params, self.masters):
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is None:
                master.grad = None
                continue
            master.grad = g if g.dtype == torch.float32 else g.float()
            grads.append(master.grad)
            if self.counts_in_norm(name, p):
                norm_grads.append(master.grad)
        return grads, norm_grads

    def step(self, lr: float, grad_norm_sq_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> float:
        """Clip, step AdamW at `lr`, copy masters into low-precision params; return the grad norm.

        grad_norm_sq_reduce sums the local squared norm across model-parallel ranks. The norm is
        taken before clipping; grads are scaled by clip / (norm + 1e-6) when norm > clip
        (Megatron). A non-finite norm skips the update so NaNs never reach the weights.
        """
        grads, norm_grads = self._gather_grads()
        try:
            if norm_grads:
                norm_sq = torch.stack(torch._foreach_norm(norm_grads, 2.0)).square().sum()
            else:
                norm_sq = torch.zeros((), dtype=torch.float32, device=self.device)
            if grad_norm_sq_reduce is not None:
                norm_sq = grad_norm_sq_reduce(norm_sq)
            norm = math.sqrt(float(norm_sq))
            if not math.isfinite(norm):
                return norm
            if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
                torch._foreach_mul_(grads, self.cfg.clip_grad / (norm + 1e-6))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            low = [(p, m) for p, m in zip(self.params, self.masters) if p is not m]
            if low:
                with torch.no_grad():
                    torch._foreach_copy_([p for p, _ in low], [m for _, m in low])
            return norm
        finally:
            for m in self.masters:
                # Drop the alias of main_grad, on every path (a skipped step included): a .grad
                # left on an fp32 parameter would make autograd accumulate into the buffer in
                # place and the main_grad hook then count it twice.
                m.grad = None

    @torch.no_grad()
    def sync_masters_from_params(self) -> None:
        """Re-read the masters from the parameters, after weights were loaded into the model."""
        for p, m in zip(self.params, self.masters):
            if p is not m:
                m.copy_(p)

    def zero_grad(self) -> None:
        """Zero `main_grad` buffers where attached; drop `.grad` everywhere."""
        for p, master in zip(self.params, self.masters):
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.zero_()
            p.grad = None
            master.grad = None

    def state_dict(self) -> dict:
        """Name-keyed state: per-parameter AdamW moments and step, and the fp32 masters of non-fp32 params."""
        state = {name: dict(self.optimizer.state[m]) for name, m in zip(self.names, self.masters)
                 if m in self.optimizer.state}
        masters = {name: m for name, p, m in zip(self.names, self.params, self.masters) if p is not m}
        return {"state": state, "master_params": masters}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what `state_dict` saved (names must match; tensors are copied)."""
        by_name = dict(zip(self.names, self.masters))
        unknown = set(sd["state"]) - set(by_name)
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {sorted(unknown)[:5]}")
        native = self.optimizer.state_dict()
        # torch numbers params by their order across param groups, not by our list order.
        order = [id(m) for g in self.optimizer.param_groups for m in g["params"]]
        native["state"] = {order.index(id(by_name[name])): s for name, s in sd["state"].items()}
        self.optimizer.load_state_dict(native)
        with torch.no_grad():
            for name, value in sd.get("master_params", {}).items():
                by_name[name].copy_(value)
            for p, m in zip(self.params, self.masters):
                if p is not m:
                    p.copy_(m)


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    counts_in_norm: Optional[Callable[[str, nn.Parameter], bool]] = None) -> MasterWeightOptimizer:
    """A MasterWeightOptimizer over the model's trainable parameters."""
    return MasterWeightOptimizer(model.named_parameters(), cfg, counts_in_norm)

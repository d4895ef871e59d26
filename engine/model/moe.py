"""Mixture-of-experts feed-forward: a top-k router, SwiGLU experts, dropless dispatch, balance loss.

Router: fp32 logits x W_r^T, softmax over the E experts, the top k kept and renormalised over
those k (Mixtral). Every routed copy of a token is computed (dropless: no capacity factor), so a
token's output does not depend on which other tokens share its batch or its rank: the property
the expert-parallel parity tests rest on.

Experts: E SwiGLU MLPs whose weights are stacked as 2-D matrices: gate/up [E * ffn, h], down
[E * h, ffn]. Checkpoints, ZeRO's flat shards and expert-parallel slices (chunks of dim 0, see
parallel/sharding.py) then treat them like any other matrix, and expert e's block is rows
[e * ffn, (e + 1) * ffn). Copies of tokens are sorted by expert and each expert runs on its
contiguous block; under expert parallelism `dispatcher` (parallel/expert_parallel.py) moves the
blocks to the rank holding their expert and back.

Load balancing: DeepSeek-V3's sequence-wise auxiliary loss. For sequence s of T tokens,
f_e = E / (k T) * (copies routed to e) and the loss is coeff * sum_t sum_e f_e p_te, averaged
over the step's tokens like the language-model loss, so its value (coeff for a uniform router)
and gradient are the same in every layout. It enters backward through `_AddAuxLossGrad` (Megatron's
MoEAuxLossAutoScaler): the layer output carries the auxiliary loss's gradient, scaled by
`aux_loss_scale` = coeff / (the step's global token count), which the trainer sets.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ModelConfig


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on the output; in backward, also sends `scale` as the gradient of the aux loss."""

    @staticmethod
    def forward(ctx, output: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


class ExpertWeights(nn.Module):
    """E matrices of shape [rows, cols] stacked as one [E * rows, cols] parameter."""

    def __init__(self, num_experts: int, rows: int, cols: int):
        super().__init__()
        self.rows = rows
        self.weight = nn.Parameter(torch.empty(num_experts * rows, cols))

    def expert(self, e: int) -> Tensor:
        """Local expert e's [rows, cols] matrix (a view)."""
        return self.weight[e * self.rows:(e + 1) * self.rows]


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (see the module doc). Input and output [b, s, h]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        self.num_experts, self.topk = cfg.num_experts, cfg.moe_topk
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        # Expert parallelism replaces these with this rank's slice (`shard_experts`).
        self.gate_proj = ExpertWeights(cfg.num_experts, ffn, cfg.hidden_size)
        self.up_proj = ExpertWeights(cfg.num_experts, ffn, cfg.hidden_size)
        self.down_proj = ExpertWeights(cfg.num_experts, cfg.hidden_size, ffn)
        self.local_experts = cfg.num_experts
        self.dispatcher = None  # parallel.expert_parallel.ExpertParallelDispatcher when ep > 1
        # Sums the per-sequence expert counts over the ranks that hold parts of one sequence
        # (context parallelism); identity otherwise.
        self.count_reduce: Optional[Callable[[Tensor], Tensor]] = None
        self.aux_loss_coeff = cfg.moe_aux_loss_coeff
        self.aux_loss_scale = 0.0  # coeff / global token count, set by the trainer (set_aux_loss_scale)
        # coeff * (this rank's unscaled balance loss) summed over the forwards since the last
        # `take_aux_loss`: what the trainer logs (detached; a plain attribute so .to() leaves it fp32).
        self.aux_loss_sum = torch.zeros(())

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, h] -> (router probabilities [T, E] fp32, top-k weights [T, k] fp32, top-k experts [T, k])."""
        probs = F.linear(x.float(), self.router.weight.float()).softmax(dim=-1)
        top_p, top_e = probs.topk(self.topk, dim=-1)
        return probs, top_p / top_p.sum(dim=-1, keepdim=True), top_e

    def experts(self, rows: Tensor, counts: list) -> Tensor:
        """Rows grouped by local expert (counts[e] rows for expert e) -> SwiGLU outputs, same order."""
        outputs = []
        for e, block in enumerate(rows.split(counts)):
            hidden = F.silu(F.linear(block, self.gate_proj.expert(e))) * F.linear(block, self.up_proj.expert(e))
            outputs.append(F.linear(hidden, self.down_proj.expert(e)))
        return torch.cat(outputs)

    def aux_loss(self, probs: Tensor, top_e: Tensor, batch: int) -> Tensor:
        """This rank's share of the sequence-wise balance loss, summed over its tokens (unscaled)."""
        tokens = probs.shape[0] // batch
        counts = torch.zeros(batch, self.num_experts, device=probs.device)
        counts.scatter_add_(1, top_e.view(batch, -1), torch.ones(top_e.numel(), device=probs.device).view(batch, -1))
        if self.count_reduce is not None:
            counts = self.count_reduce(counts)
        # Every sequence routes k copies of each of its tokens: the counts of a row sum to k * T.
        f = counts * (self.num_experts / counts.sum(dim=1, keepdim=True))
        return (probs.view(batch, tokens, -1) * f[:, None, :]).sum()

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs, weights, top_e = self.route(flat)
        # Copies of tokens sorted by expert (stable: within an expert, in token order).
        expert_of_copy = top_e.reshape(-1)
        order = torch.argsort(expert_of_copy, stable=True)
        token_of_copy = order // self.topk
        counts = torch.bincount(expert_of_copy, minlength=self.num_experts)
        rows = flat[token_of_copy]
        if self.dispatcher is None:
            out_rows = self.experts(rows, counts.tolist())
        else:
            local_rows, local_counts, plan = self.dispatcher.dispatch(rows, counts)
            out_rows = self.dispatcher.combine(self.experts(local_rows, local_counts), plan)
        weighted = out_rows * weights.reshape(-1)[order, None].to(out_rows.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of_copy, weighted).view(b, s, h)
        if self.aux_loss_coeff and self.training and torch.is_grad_enabled():
            aux = self.aux_loss(probs, top_e, b)
            self.aux_loss_sum = self.aux_loss_sum.to(aux.device) + self.aux_loss_coeff * aux.detach()
            out = _AddAuxLossGrad.apply(out, aux, self.aux_loss_scale)
        return out

    @torch.no_grad()
    def shard_experts(self, dispatcher) -> None:
        """Keep only this rank's experts (chunk `group.rank` of dim 0) and route through `dispatcher`."""
        from parallel.sharding import EP_SHARD

        group = dispatcher.group
        for module in (self.gate_proj, self.up_proj, self.down_proj):
            local = module.weight.chunk(group.size, dim=0)[group.rank].clone()
            module.weight = nn.Parameter(local)
            setattr(module.weight, EP_SHARD, (0, group.rank, group.size))
        self.local_experts = dispatcher.local_experts
        self.dispatcher = dispatcher


def moe_layers(model: nn.Module) -> Iterator[MoE]:
    """Every MoE layer of `model` (one model chunk)."""
    return (m for m in model.modules() if isinstance(m, MoE))


def set_aux_loss_scale(chunks: list, global_tokens: int) -> None:
    """Scale each MoE layer's balance-loss gradient by coeff / global_tokens (the LM loss's divisor)."""
    for chunk in chunks:
        for moe in moe_layers(chunk):
            moe.aux_loss_scale = moe.aux_loss_coeff / global_tokens



def take_aux_loss(chunks: list) -> Tensor:
    """The balance-loss sum of every MoE layer in `chunks` since the last call (coeff included, not
    yet divided by tokens); resets the layers' sums. Zero when there are no MoE layers."""
    total = torch.zeros((), dtype=torch.float32)
    for chunk in chunks:
        for moe in moe_layers(chunk):
            total = total + moe.aux_loss_sum.float().cpu()
            moe.aux_loss_sum = torch.zeros(())
    return total

"""Tensor and sequence parallelism (Megatron: Shoeybi et al. 2019; Korthikanti et al. 2022).

How a model becomes tensor-parallel: a *plan applied from outside* (torchtitan's approach). The
model file holds no parallel code; it is written with plain `nn.Linear` / `nn.Embedding` and
derives local head counts from weight shapes. `apply_tensor_parallel(model, plan, group, sp)`
walks the module names, and for each name matching a pattern of the plan applies a *style*:
it either swaps the module for a parallel one with the same parameter names (so layout-invariant
init gives each rank its slice, and checkpoints keep their keys) or attaches what the region
needs (a forward hook, a gradient marker). The plan is data, so the model-specific part is one
dict per model family (engine/model/parallelize.py holds Llama's) and this module knows no model.

Styles (a plan value is one style or a tuple of them, applied in order):

    colwise               ColumnParallelLinear that enters the TP region itself (f, or the SP
                          all-gather of the sequence), output sharded on the last dim
    colwise_shared_input  ColumnParallelLinear whose input already entered the TP region once for
                          all the projections that share it (q/k/v; gate/up), so there is one f
                          per block instead of one per projection: Megatron fuses QKV for this
    rowwise               RowParallelLinear: input sharded on the last dim, output summed by g
                          (all-reduce) or, with SP, reduce-scattered along the sequence
    vocab_embedding       VocabParallelEmbedding: vocabulary rows sharded, masked lookup, g / SP
                          reduce-scatter
    vocab_head            the output projection as a column-parallel layer over the vocabulary;
                          the logits stay vocab-sharded (`vocab_parallel_cross_entropy` never
                          gathers them); its input enters the TP region upstream
    enter_tp_region       forward hook on the module's *output*: f, or with SP the all-gather
                          along the sequence. Put on the norms of a pre-norm transformer, whose
                          outputs feed exactly the column-parallel layers (and the head, which the
                          model applies functionally with `F.linear(norm(h), output_weight())`)
    sequence_parallel     a replicated module (norm) that runs on the sequence shard under SP: its
                          parameters get `tp_partial_grad = True` (Megatron's `sequence_parallel`
                          attribute): each TP rank's gradient covers only its tokens
    head_sharded          a replicated module applied per head (QK-norm): its gradient covers only
                          this rank's heads, so it is marked `tp_partial_grad` with or without SP

Parameters marked `tp_partial_grad` must have their gradients summed over the TP group after
backward (engine/parallelize.finish_sequence_parallel_grads). Sharded parameters carry
`tp_shard = (dim, tp_rank, tp)`; `engine.model.decoder.init_parameters` then draws chunk tp_rank of the
full tensor alone (parallel/tiled_random.py), so TP starts from exactly the single-rank weights. A
replaced module's parameters live on the original's device: a plan applied on the meta device
allocates nothing (engine/model/meta_init.py).

Sequence parallelism keeps the residual stream [b, s/t, h] between blocks: the embedding
reduce-scatters, each norm runs on its shard and all-gathers its output into the column-parallel
layers (attention sees the full sequence, so RoPE positions are those of the full sequence:
pass them to the model explicitly), and each row-parallel layer reduce-scatters back.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.collectives import Group, all_reduce
from parallel.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region, reduce_from_tp_region,
                               reduce_scatter_to_sequence_parallel_region)

PARTIAL_GRAD_ATTR = "tp_partial_grad"
"""Parameter attribute: its gradient is a partial sum over the TP group (SP norms, QK-norms)."""

CROSS_ENTROPY_PURPOSE = "cross_entropy"
"""Ledger op of the vocab-parallel cross-entropy's reductions (3 fp32 values per token)."""


def _shard_size(size: int, group: Group, what: str) -> int:
    if size % group.size:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {group.size}")
    return size // group.size


def enter_tp_region(x: Tensor, group: Group, sequence_parallel: bool) -> Tensor:
    """Make `x` the input of column-parallel layers: f, or with SP the all-gather along the sequence."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, group)
    return copy_to_tp_region(x, group)


def leave_tp_region(x: Tensor, group: Group, sequence_parallel: bool) -> Tensor:
    """Sum the partial outputs of row-parallel work: g, or with SP the reduce-scatter along the sequence."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(x, group)
    return reduce_from_tp_region(x, group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows sharded: this rank holds rows [r*out/t, (r+1)*out/t).

    enter_region=True applies f (or the SP all-gather) to the input here; False means a caller
    already did, once for every projection that shares the input. The output stays sharded on
    its last dimension (the next layer is row-parallel, or the loss is vocab-parallel).
    """

    def __init__(self, in_features: int, out_features: int, group: Group, sequence_parallel: bool = False,
                 enter_region: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel, self.enter_region = group, sequence_parallel, enter_region
        local = _shard_size(out_features, group, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device))
        self.weight.tp_shard = (0, group.rank, group.size)
        # The local GEMM (x, W) -> x W^T; engine.model.fp8 swaps in its fp8 GEMM.
        self.linear_fn = F.linear

    def forward(self, x: Tensor) -> Tensor:
        if self.enter_region:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        return self.linear_fn(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), tp={self.group.size}, sequence_parallel={self.sequence_parallel}, "
                f"enter_region={self.enter_region}")


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T with W's input columns sharded; summed by g or the SP reduce-scatter."""

    def __init__(self, in_features: int, out_features: int, group: Group, sequence_parallel: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel = group, sequence_parallel
        local = _shard_size(in_features, group, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device))
        self.weight.tp_shard = (1, group.rank, group.size)
        self.linear_fn = F.linear  # the local GEMM, as in ColumnParallelLinear

    def forward(self, x: Tensor) -> Tensor:
        return leave_tp_region(self.linear_fn(x, self.weight), self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"tp={self.group.size}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with vocabulary rows sharded; tokens outside this rank's range look up zeros.

    The partial embeddings are summed by g, or with SP reduce-scattered along the sequence so each
    rank continues with s/t tokens.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group, sequence_parallel: bool = False,
                 device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group, self.sequence_parallel = group, sequence_parallel
        local = _shard_size(num_embeddings, group, "num_embeddings (vocab_size)")
        self.vocab_start = group.rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device))
        self.weight.tp_shard = (0, group.rank, group.size)

    def forward(self, ids: Tensor) -> Tensor:
        local_ids = ids - self.vocab_start
        in_shard = (local_ids >= 0) & (local_ids < self.weight.shape[0])
        out = F.embedding(local_ids.where(in_shard, 0), self.weight)
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0.0)
        return leave_tp_region(out, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
                f"{self.vocab_start + self.weight.shape[0]}), tp={self.group.size}, "
                f"sequence_parallel={self.sequence_parallel}")


# ---------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary-sharded logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token lse - target_logit (+ z * lse^2) from vocab-sharded logits; three all-reduced values per token."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group: Group, z_loss_weight: float):
        logits32 = logits.float()
        vocab_local = logits.shape[-1]
        vocab_start = group.rank * vocab_local
        # The global max keeps exp() in range; it cancels in the gradient, so it is a constant.
        logits_max = logits32.max(dim=-1).values
        all_reduce(logits_max, group, op=torch.distributed.ReduceOp.MAX, purpose=CROSS_ENTROPY_PURPOSE)
        shifted = logits32 - logits_max.unsqueeze(-1)
        local_targets = targets - vocab_start
        in_shard = (local_targets >= 0) & (local_targets < vocab_local)
        local_targets = local_targets.where(in_shard, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1) * in_shard
        exp = shifted.exp()
        # One reduction for both sums: sum of exp over the vocabulary, and the target's logit
        # (only the rank that holds the target contributes).
        stats = torch.stack((exp.sum(dim=-1), target_logit))
        all_reduce(stats, group, purpose=CROSS_ENTROPY_PURPOSE)
        log_sum_exp_shifted = stats[0].log()
        per_token = log_sum_exp_shifted - stats[1]
        lse = log_sum_exp_shifted + logits_max
        if z_loss_weight:
            per_token = per_token + z_loss_weight * lse.square()
        softmax = exp.div_(stats[0].unsqueeze(-1))
        ctx.save_for_backward(softmax, in_shard, local_targets, lse)
        ctx.z_loss_weight, ctx.logits_dtype = z_loss_weight, logits.dtype
        return per_token

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, in_shard, local_targets, lse = ctx.saved_tensors
        # d(lse)/dlogit = softmax; d(z * lse^2)/dlogit = 2 z lse softmax; d(-target)/dlogit = -onehot.
        if ctx.z_loss_weight:
            grad_logits = softmax * (1.0 + 2.0 * ctx.z_loss_weight * lse).unsqueeze(-1)
        else:
            grad_logits = softmax.clone()
        grad_logits.scatter_add_(-1, local_targets.unsqueeze(-1), -in_shard.to(grad_logits.dtype).unsqueeze(-1))
        grad_logits.mul_(grad.unsqueeze(-1))
        return grad_logits.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: Tensor, targets: Tensor, group: Group, z_loss_weight: float = 0.0,
                                 loss_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy (+ z-loss) from logits sharded over the vocabulary; never gathers them.

    logits_shard [b, s, V/t] holds vocabulary rows [r*V/t, (r+1)*V/t) of this TP rank; the max,
    the sum of exp and the target logit are all-reduced over `group` (booked as 'cross_entropy':
    3 * b * s * 4 bytes). Returns (loss_sum fp32, token_count int64) like `engine.model.decoder.lm_loss`,
    and the same value on every TP rank.
    """
    from_shard = _VocabParallelCrossEntropy.apply(logits_shard, targets, group, z_loss_weight)
    if loss_mask is None:
        return from_shard.sum(), torch.tensor(targets.numel(), device=targets.device)
    loss_mask = loss_mask.to(from_shard.dtype)
    return (from_shard * loss_mask).sum(), loss_mask.sum().long()


# ---------------------------------------------------------------------------------------------
# Applying a plan


PlanValue = Union[str, tuple]

STYLES = ("colwise", "colwise_shared_input", "rowwise", "vocab_embedding", "vocab_head", "enter_tp_region",
          "sequence_parallel", "head_sharded")
"""Every style a plan may name (see the module docstring)."""


def _mark_partial_grads(module: nn.Module) -> None:
    for p in module.parameters():
        setattr(p, PARTIAL_GRAD_ATTR, True)


def _linear_shape(module: nn.Module, name: str, style: str) -> tuple[int, int, torch.device]:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"tensor-parallel plan: {name!r} is a {type(module).__name__}; style {style!r} needs nn.Linear")
    if module.bias is not None:
        raise ValueError(f"tensor-parallel plan: {name!r} has a bias; parallel linears here are bias-free (as Llama's)")
    return module.in_features, module.out_features, module.weight.device


def _apply_style(model: nn.Module, name: str, style: str, group: Group, sequence_parallel: bool) -> None:
    module = model.get_submodule(name)
    replacement: Optional[nn.Module] = None
    if style in ("colwise", "colwise_shared_input", "vocab_head"):
        in_f, out_f, device = _linear_shape(module, name, style)
        replacement = ColumnParallelLinear(in_f, out_f, group, sequence_parallel,
                                           enter_region=style == "colwise", device=device)
    elif style == "rowwise":
        in_f, out_f, device = _linear_shape(module, name, style)
        replacement = RowParallelLinear(in_f, out_f, group, sequence_parallel, device=device)
    elif style == "vocab_embedding":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"tensor-parallel plan: {name!r} is a {type(module).__name__}; "
                            f"style 'vocab_embedding' needs nn.Embedding")
        replacement = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, group, sequence_parallel,
                                             device=module.weight.device)
    elif style == "enter_tp_region":
        module.register_forward_hook(lambda _module, _inputs, output: enter_tp_region(output, group, sequence_parallel))
    elif style == "sequence_parallel":
        if sequence_parallel:
            _mark_partial_grads(module)
    elif style == "head_sharded":
        _mark_partial_grads(module)
    else:
        raise ValueError(f"tensor-parallel plan: unknown style {style!r} for {name!r}; valid styles: {', '.join(STYLES)}")
    if replacement is not None:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def apply_tensor_parallel(model: nn.Module, plan: Mapping[str, PlanValue], group: Group,
                          sequence_parallel: bool = False) -> list[tuple[str, str]]:
    """Apply `plan` ({module-name pattern: style or tuple of styles}) in place; return the (name, style) applied.

    Patterns are fnmatch patterns over `named_modules()` names ('layers.*.mlp.down_proj'); a
    pattern that matches nothing is allowed (a pipeline stage holds only some modules). Call it
    before `init_parameters`, so that sharded parameters receive their slices. At tp=1 nothing
    changes. Applying a plan twice is an error.
    """
    if group.size == 1:
        return []
    if getattr(model, "_tensor_parallel_plan", None) is not None:
        raise RuntimeError("apply_tensor_parallel: this model already has a tensor-parallel plan applied")
    names = [name for name, _ in model.named_modules() if name]
    applied = []
    for pattern, styles in plan.items():
        for style in ((styles,) if isinstance(styles, str) else tuple(styles)):
            for name in names:
                if fnmatch.fnmatchcase(name, pattern):
                    _apply_style(model, name, style, group, sequence_parallel)
                    applied.append((name, style))
    model._tensor_parallel_plan = dict(plan)
    return applied

"""Turning the Llama model into this rank's parallel form, and what the step needs around it.

torchtitan's `parallelize` step: the model (engine/model/decoder.py) holds no parallel code; here the
Llama-specific tensor-parallel plan (`LLAMA_TP_PLAN`) is applied to it from outside with the
generic styles of parallel/tensor_parallel.py, on the meta device and before `materialize`
(engine/model/meta_init.py), so each rank allocates and draws only its slices of the
layout-invariant initial weights. Around the model, the trainer gets
the pieces whose behaviour depends on the layout: the loss (vocab-parallel at tp > 1), which
gradients count in the global norm and how the norm is reduced, the TP reduction of partial
gradients (sequence-parallel norms), and a gather of full weights for parity tests and export.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from engine.config import ApogeeConfig
from engine.model.decoder import Attention, LlamaModel, lm_loss
from parallel.collectives import CommLedger, Group, all_gather_along, all_gather_objects, all_reduce
from engine.model.moe import MoE
from parallel.context_parallel import RingAttention
from parallel.expert_parallel import ExpertParallelDispatcher
from parallel.sharding import is_expert_shard, shard_of
from parallel.tensor_parallel import PARTIAL_GRAD_ATTR, apply_tensor_parallel, vocab_parallel_cross_entropy

LLAMA_TP_PLAN = MappingProxyType({
    # Megatron's layout of a pre-norm Llama block. Each norm's output enters the TP region once
    # (f, or the SP all-gather) for all the column-parallel projections it feeds; the final
    # norm's output feeds the vocab-parallel head, which the model applies functionally.
    "embed_tokens": "vocab_embedding",
    "layers.*.input_layernorm": ("sequence_parallel", "enter_tp_region"),
    "layers.*.self_attn.q_proj": "colwise_shared_input",
    "layers.*.self_attn.k_proj": "colwise_shared_input",
    "layers.*.self_attn.v_proj": "colwise_shared_input",
    "layers.*.self_attn.q_norm": "head_sharded",
    "layers.*.self_attn.k_norm": "head_sharded",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.post_attention_layernorm": ("sequence_parallel", "enter_tp_region"),
    "layers.*.mlp.gate_proj": "colwise_shared_input",
    "layers.*.mlp.up_proj": "colwise_shared_input",
    "layers.*.mlp.down_proj": "rowwise",
    "norm": ("sequence_parallel", "enter_tp_region"),
    "lm_head": "vocab_head",
})
"""Module-name pattern -> tensor-parallel style(s) for `engine.model.decoder.LlamaModel` (read-only)."""


def parallelize_model(model: LlamaModel, cfg: ApogeeConfig, ctx, ledger: CommLedger) -> LlamaModel:
    """Apply LLAMA_TP_PLAN over ctx's TP group (SP per cfg.parallel.sequence_parallel) and ring attention over CP.

    Call before `init_parameters`. With sequence parallelism the residual stream holds s/t tokens,
    so the forward must be given the full sequence's RoPE positions (`model(x, positions=...)`).
    At cp > 1 every attention core becomes ring attention over the CP group; the rest of the
    model is token-wise and runs unchanged on this rank's zigzag chunks of the sequence.
    """
    cp = ctx.comm_group("cp", ledger)
    if cp.size > 1:
        for module in model.modules():
            if isinstance(module, Attention):
                module.core = RingAttention(cp)
    ep = ctx.comm_group("ep", ledger)
    for module in model.modules():
        if isinstance(module, MoE):
            if ep.size > 1:
                module.shard_experts(ExpertParallelDispatcher(ep, cfg.model.num_experts))
            if cp.size > 1:
                # The balance loss counts a sequence's routing over all of its CP chunks.
                module.count_reduce = lambda counts: _summed(counts, cp, "moe_counts")
    tp = ctx.comm_group("tp", ledger)
    if tp.size == 1:
        return model
    apply_tensor_parallel(model, LLAMA_TP_PLAN, tp, sequence_parallel=cfg.parallel.sequence_parallel)
    return model


def _summed(tensor: Tensor, group: Group, purpose: str) -> Tensor:
    """A copy of `tensor` summed over `group` (no gradient flows through it)."""
    tensor = tensor.detach().clone()
    all_reduce(tensor, group, purpose=purpose)
    return tensor


def loss_function(cfg: ApogeeConfig, ctx, ledger: CommLedger) -> Callable[..., tuple[Tensor, Tensor]]:
    """(logits, targets, loss_mask=None) -> (loss_sum, token_count): lm_loss at tp=1, vocab-parallel otherwise."""
    z = cfg.model.z_loss_weight
    tp = ctx.comm_group("tp", ledger)
    if tp.size == 1:
        return lambda logits, targets, loss_mask=None: lm_loss(logits, targets, z, loss_mask)
    return lambda logits, targets, loss_mask=None: vocab_parallel_cross_entropy(logits, targets, tp, z, loss_mask)


def counts_in_norm(ctx, tie_embeddings: bool = False) -> Callable[[str, nn.Parameter], bool]:
    """Optimizer filter: a sharded parameter counts on every rank of its group, a replicated one on one.

    A TP shard counts on every TP rank, a TP-replicated parameter on TP rank 0 only. Under expert
    parallelism an expert shard counts on every EP rank, a dense parameter (replicated over the EP
    ranks, which are data-parallel ranks for it) on EP index 0 only; `grad_norm_sq_reduce` sums
    over both groups. With tied embeddings under pipeline parallelism the last stage's `lm_head`
    is a copy of the first stage's embedding (`all_reduce_tied_embedding_grads` keeps them
    equal): it counts once, there.
    """
    tp_rank, ep_rank = ctx.tp_rank, ctx.ep_rank
    tied_copy = "lm_head.weight" if tie_embeddings and ctx.pp_size > 1 else None

    def counts(name: str, param: nn.Parameter) -> bool:
        if name == tied_copy:
            return False
        tp_ok = getattr(param, "tp_shard", None) is not None or tp_rank == 0
        return tp_ok and (is_expert_shard(param) or ep_rank == 0)

    return counts


def all_reduce_tied_embedding_grads(chunks: list[nn.Module], ctx, ledger: CommLedger) -> None:
    """Sum the first stage's embedding gradient with the last stage's tied lm_head gradient.

    Megatron's embedding group: with tie_embeddings and pp > 1 the two stages hold separate copies
    of one matrix, initialised equal; adding their gradients gives both the single-model gradient,
    so the copies stay bitwise equal. Run after the DP reduction. Booked as 'tied_embedding_grads'.
    """
    group = ctx.comm_group("embedding", ledger)
    if group.size == 1 or not chunks[0].cfg.tie_embeddings:
        return
    for chunk in chunks:
        module = chunk.embed_tokens if chunk.embed_tokens is not None else chunk.lm_head
        if module is not None:
            all_reduce(module.weight.main_grad, group, purpose="tied_embedding_grads")


def expert_gradient_group(ctx, ledger: CommLedger) -> Group:
    """The group over which expert-parallel weights' gradients are summed: 'expert-dp' (the ranks
    holding the same experts; world / (ep * pp) of them)."""
    return ctx.comm_group("expert-dp", ledger)


def gradient_reduction_group(ctx, ledger: CommLedger) -> Group:
    """The group over which gradients (and the step's loss sum) are summed: 'dp', or 'dp-cp' at cp > 1.

    CP ranks hold the same weights but different tokens of each sample, so their gradients are
    partial sums over the sequence, reduced together with the DP ones (as Megatron does over dp x cp).
    Data is still sharded by dp rank: the CP ranks of one DP rank read the same samples.
    """
    return ctx.comm_group("dp-cp" if ctx.cp_size > 1 else "dp", ledger)


def grad_norm_sq_reduce(ctx, ledger: CommLedger) -> Optional[Callable[[Tensor], Tensor]]:
    """Sum the local squared grad norm over the model-parallel ranks (the tp-pp group, and the EP
    group, whose ranks hold different experts); None when alone.

    DP ranks hold identical (reduced) gradients, so they are left out. Booked as 'grad_norm'.
    """
    groups = [g for g in (ctx.comm_group("ep", ledger), ctx.comm_group("tp-pp", ledger)) if g.size > 1]
    if not groups:
        return None

    def reduce(norm_sq: Tensor) -> Tensor:
        for group in groups:
            norm_sq = _summed(norm_sq, group, "grad_norm")
        return norm_sq

    return reduce


def finish_sequence_parallel_grads(model: nn.Module, group: Group) -> None:
    """Sum over TP the gradients marked `tp_partial_grad` (SP norms, QK-norms), in one flat all-reduce.

    Run after the DP reduction has finished; reads `main_grad` when present, else `.grad`.
    Booked as 'sequence_parallel_grads'.
    """
    if group.size == 1:
        return
    grads = []
    for param in model.parameters():
        if getattr(param, PARTIAL_GRAD_ATTR, False):
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat, group, purpose="sequence_parallel_grads")
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


@torch.no_grad()
def gather_full_state_dict(model: nn.Module | list[nn.Module], ctx) -> dict[str, Tensor]:
    """Full (unsharded) parameters by name on every rank: TP (EP) slices concatenated in TP (EP) order,
    and the parameters of every pipeline stage's chunks (a model or this rank's list of chunks).

    Collective over the TP, EP and PP groups (every rank must call it). The gather is booked in a
    ledger of its own, so it never shows in the training step's traffic. With tied embeddings
    under pipeline parallelism the last stage's `lm_head.weight` copy is included.
    """
    ledger = CommLedger()
    tp, ep = ctx.comm_group("tp", ledger), ctx.comm_group("ep", ledger)
    full = {}
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        for name, param in chunk.named_parameters():
            if param.numel() and not param.untyped_storage().nbytes():  # reading it would read freed memory
                raise RuntimeError(f"gather_full_state_dict: {name} holds no storage (a ZeRO-3 parameter between "
                                   f"layers); call it inside the trainer's `grads.gathered()`")
            shard = shard_of(param)
            value = param.detach()
            if shard is not None and shard[2] > 1:
                value = all_gather_along(value, shard[0], ep if is_expert_shard(param) else tp, purpose="export")
            full[name] = value.clone()
    if ctx.pp_size > 1:  # each stage holds different names (layers by global index)
        for stage_state in all_gather_objects(full, ctx.comm_group("pp", ledger), purpose="export"):
            full.update(stage_state)
    return full

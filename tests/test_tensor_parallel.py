"""Tensor/sequence parallelism: the mappings, the parallel layers, the vocab-parallel loss and the Llama plan.

Multi-rank checks run together in one 2-rank spawn (starting ranks costs seconds); each check
reports its own failure, and each test asserts one check.
"""
import dataclasses
import traceback

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model.decoder import LlamaModel, init_parameters, lm_loss
from engine.model.parallelize import LLAMA_TP_PLAN, parallelize_model
from parallel.collectives import CommLedger, Group
from parallel.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region, reduce_from_tp_region,
                               reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region)
from parallel.tensor_parallel import (PARTIAL_GRAD_ATTR, ColumnParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, apply_tensor_parallel, vocab_parallel_cross_entropy)

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                   vocab_size=64, seq_length=16, make_vocab_size_divisible_by=1)


def _fake_tp_group(rank=0, size=2):
    """A TP group for construction-only tests (no communication happens)."""
    return Group("tp", None, size, rank, CommLedger())


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Single process: the plan


def test_plan_swaps_llama_modules_keeping_names_and_marking_shards():
    model = LlamaModel(TINY)
    names = [n for n, _ in model.named_parameters()]
    applied = apply_tensor_parallel(model, LLAMA_TP_PLAN, _fake_tp_group(rank=1), sequence_parallel=True)
    assert [n for n, _ in model.named_parameters()] == names
    attn, mlp = model.layers["0"].self_attn, model.layers["0"].mlp
    assert isinstance(attn.q_proj, ColumnParallelLinear) and not attn.q_proj.enter_region
    assert attn.q_proj.weight.shape == (16, 32) and attn.q_proj.weight.tp_shard == (0, 1, 2)
    assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.weight.tp_shard == (1, 1, 2)
    assert mlp.down_proj.weight.shape == (32, 24)
    assert isinstance(model.embed_tokens, VocabParallelEmbedding) and model.embed_tokens.vocab_start == 32
    assert model.lm_head.weight.shape == (32, 32)
    assert getattr(model.norm.weight, PARTIAL_GRAD_ATTR, False)
    assert ("layers.1.post_attention_layernorm", "enter_tp_region") in applied


def test_norms_are_partial_grad_only_under_sequence_parallelism_but_qk_norms_always():
    model = LlamaModel(dataclasses.replace(TINY, qk_norm=True))
    apply_tensor_parallel(model, LLAMA_TP_PLAN, _fake_tp_group(), sequence_parallel=False)
    marked = {n for n, p in model.named_parameters() if getattr(p, PARTIAL_GRAD_ATTR, False)}
    assert marked == {f"layers.{i}.self_attn.{k}_norm.weight" for i in range(2) for k in "qk"}


def test_sharded_init_is_the_slice_of_the_single_rank_init():
    full = LlamaModel(TINY)
    init_parameters(full, 7)
    for rank in range(2):
        shard = LlamaModel(TINY)
        apply_tensor_parallel(shard, LLAMA_TP_PLAN, _fake_tp_group(rank=rank))
        init_parameters(shard, 7)
        for name, p in shard.named_parameters():
            dim = p.tp_shard[0] if hasattr(p, "tp_shard") else None
            expected = full.get_parameter(name) if dim is None else full.get_parameter(name).chunk(2, dim)[rank]
            torch.testing.assert_close(p, expected, rtol=0, atol=0)


def test_plan_errors_name_the_module_and_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown style 'diagonal' for 'norm'.*colwise"):
        apply_tensor_parallel(LlamaModel(TINY), {"norm": "diagonal"}, _fake_tp_group())
    with pytest.raises(TypeError, match=r"'norm' is a RMSNorm; style 'rowwise' needs nn.Linear"):
        apply_tensor_parallel(LlamaModel(TINY), {"norm": "rowwise"}, _fake_tp_group())
    with pytest.raises(ValueError, match=r"out_features=48 is not divisible by the tensor-parallel size 5"):
        apply_tensor_parallel(LlamaModel(TINY), {"layers.*.mlp.up_proj": "colwise"}, _fake_tp_group(size=5))
    model = LlamaModel(TINY)
    apply_tensor_parallel(model, LLAMA_TP_PLAN, _fake_tp_group())
    with pytest.raises(RuntimeError, match="already has a tensor-parallel plan"):
        apply_tensor_parallel(model, LLAMA_TP_PLAN, _fake_tp_group())


def test_tp1_leaves_the_model_untouched():
    model = LlamaModel(TINY)
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_tensor_parallel(model, LLAMA_TP_PLAN, _fake_tp_group(size=1)) == []
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_vocab_parallel_cross_entropy_at_tp1_equals_lm_loss_with_z_loss_and_mask():
    logits = _randn(2, 5, 11, seed=0).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    loss, count = vocab_parallel_cross_entropy(logits, targets, _fake_tp_group(size=1), 1e-3, mask)
    ref_logits = logits.detach().clone().requires_grad_()
    ref, ref_count = lm_loss(ref_logits, targets, 1e-3, mask)
    torch.testing.assert_close(loss, ref)
    assert count == ref_count
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


# ---------------------------------------------------------------------------------------------
# Two ranks: mappings, layers, loss, whole model


def _check_mappings(rank, tp):
    ledger = tp.ledger
    x = _randn(2, 4, 3, seed=0).requires_grad_()
    grads = [_randn(2, 4, 3, seed=10 + r) for r in range(2)]
    copy_to_tp_region(x, tp).backward(grads[rank])  # f: identity, all-reduced gradient
    torch.testing.assert_close(x.grad, grads[0] + grads[1])
    assert dict(ledger.bytes) == {("tp", "all_reduce"): 96}
    ledger.reset()

    parts = [_randn(2, 4, 3, seed=20 + r) for r in range(2)]
    x = parts[rank].clone().requires_grad_()
    y = reduce_from_tp_region(x, tp)  # g: all-reduce, identity gradient
    torch.testing.assert_close(y, parts[0] + parts[1])
    y.backward(grads[rank])
    torch.testing.assert_close(x.grad, grads[rank])

    ledger.reset()
    x = parts[rank].clone().requires_grad_()
    y = gather_from_sequence_parallel_region(x, tp)
    torch.testing.assert_close(y, torch.cat(parts, dim=1))
    full_grads = [_randn(2, 8, 3, seed=30 + r) for r in range(2)]
    y.backward(full_grads[rank])
    torch.testing.assert_close(x.grad, (full_grads[0] + full_grads[1]).chunk(2, dim=1)[rank])
    assert dict(ledger.bytes) == {("tp", "all_gather"): 192, ("tp", "reduce_scatter"): 192}

    x = torch.cat(parts, dim=1).mul(rank + 1).requires_grad_()
    y = reduce_scatter_to_sequence_parallel_region(x, tp)
    torch.testing.assert_close(y, (torch.cat(parts, dim=1) * 3).chunk(2, dim=1)[rank])
    y.backward(grads[rank])
    torch.testing.assert_close(x.grad, torch.cat(grads, dim=1))

    x = torch.cat(parts, dim=1).requires_grad_()
    y = scatter_to_sequence_parallel_region(x, tp)
    torch.testing.assert_close(y, parts[rank])
    y.backward(grads[rank])
    torch.testing.assert_close(x.grad, torch.cat(grads, dim=1))


def _check_column_row_pair(rank, tp, sequence_parallel):
    w1, w2 = _randn(8, 6, seed=1), _randn(6, 8, seed=2)
    x_full = _randn(2, 4, 6, seed=3).requires_grad_()
    grad_full = _randn(2, 4, 6, seed=4)
    ref = F.linear(F.linear(x_full, w1), w2)
    ref.backward(grad_full)
    column = ColumnParallelLinear(6, 8, tp, sequence_parallel)
    row = RowParallelLinear(8, 6, tp, sequence_parallel)
    with torch.no_grad():
        column.weight.copy_(w1.chunk(2, 0)[rank])
        row.weight.copy_(w2.chunk(2, 1)[rank])
    chunk = (lambda t: t.chunk(2, dim=1)[rank]) if sequence_parallel else (lambda t: t)
    x = chunk(x_full.detach()).clone().requires_grad_()
    y = row(column(x))
    torch.testing.assert_close(y, chunk(ref.detach()))
    y.backward(chunk(grad_full))
    torch.testing.assert_close(x.grad, chunk(x_full.grad))
    w1_grad = (grad_full @ w2).reshape(-1, 8).T @ x_full.detach().reshape(-1, 6)
    torch.testing.assert_close(column.weight.grad, w1_grad.chunk(2, 0)[rank])


def _check_embedding(rank, tp, sequence_parallel):
    weight = _randn(16, 6, seed=5)
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(6))
    grad = _randn(2, 4, 6, seed=7)
    embedding = VocabParallelEmbedding(16, 6, tp, sequence_parallel)
    with torch.no_grad():
        embedding.weight.copy_(weight.chunk(2, 0)[rank])
    y = embedding(ids)
    chunk = (lambda t: t.chunk(2, dim=1)[rank]) if sequence_parallel else (lambda t: t)
    torch.testing.assert_close(y, chunk(F.embedding(ids, weight)))
    y.backward(chunk(grad))
    full_weight = weight.clone().requires_grad_()
    F.embedding(ids, full_weight).backward(grad)
    # Under SP the backward all-gathers the sequence, so each shard's gradient is already complete.
    torch.testing.assert_close(embedding.weight.grad, full_weight.grad.chunk(2, 0)[rank])


def _check_cross_entropy(rank, tp):
    logits = _randn(2, 5, 16, seed=8) * 3
    targets = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(10)) > 0.2
    full = logits.clone().requires_grad_()
    ref, ref_count = lm_loss(full, targets, 1e-2, mask)
    ref.backward()
    shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()
    tp.ledger.reset()
    loss, count = vocab_parallel_cross_entropy(shard, targets, tp, 1e-2, mask)
    assert dict(tp.ledger.bytes) == {("tp", "cross_entropy"): 3 * 2 * 5 * 4}  # never the [b, s, V] logits
    torch.testing.assert_close(loss, ref)
    assert count == ref_count
    loss.backward()
    torch.testing.assert_close(shard.grad, full.grad.chunk(2, dim=-1)[rank])


def _check_llama(rank, ctx, sequence_parallel, vocab=64, divisor=1, tie=True):
    from engine.config import load_config
    from engine.config_validation import validate
    from engine.model.parallelize import (counts_in_norm, finish_sequence_parallel_grads, gather_full_state_dict,
                                    grad_norm_sq_reduce, loss_function)

    cfg = validate(load_config(None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=48", f"model.vocab_size={vocab}", f"model.make_vocab_size_divisible_by={divisor}",
        "model.seq_length=16", "model.qk_norm=true", f"model.tie_embeddings={str(tie).lower()}",
        "model.z_loss_weight=1e-3", "train.micro_batch_size=2",
        "train.global_batch_size=2", "parallel.tp=2", f"parallel.sequence_parallel={sequence_parallel}"]), 2)
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(11))
    positions = torch.arange(16)
    reference = LlamaModel(cfg.model)
    init_parameters(reference, 3)
    ref_loss, _ = lm_loss(reference(tokens[:, :-1]), tokens[:, 1:], 1e-3)
    ref_loss.backward()

    ledger = CommLedger()
    model = parallelize_model(LlamaModel(cfg.model), cfg, ctx, ledger)
    init_parameters(model, 3)
    loss, _ = loss_function(cfg, ctx, ledger)(model(tokens[:, :-1], positions=positions), tokens[:, 1:])
    loss.backward()
    tp = Group("tp", ctx.group("tp"), 2, ctx.tp_rank, ledger)
    finish_sequence_parallel_grads(model, tp)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        p.data = p.grad  # gather the gradients as if they were weights
    grads = gather_full_state_dict(model, ctx)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    padded = [n for n in ("embed_tokens.weight", "lm_head.weight") if n in grads]
    for name in padded:  # the padding rows (ids >= vocab_size) never get probability, so no gradient
        assert grads[name].shape[0] == cfg.model.padded_vocab_size
        assert grads[name][vocab:].abs().max() == 0 if cfg.model.padded_vocab_size > vocab else True, name
    # The global grad norm: sharded grads counted on every rank, replicated ones once.
    keep = counts_in_norm(ctx)
    local = sum(p.grad.square().sum() for n, p in model.named_parameters() if keep(n, p))
    norm_sq = grad_norm_sq_reduce(ctx, ledger)(local)
    ref_sq = sum(p.grad.square().sum() for p in reference.parameters())
    torch.testing.assert_close(norm_sq, ref_sq, rtol=1e-5, atol=0)


def _two_rank_checks(rank, world_size):
    from parallel.layout import ParallelLayout
    from parallel.topology import ParallelContext

    ctx = ParallelContext.create(ParallelLayout(tp=2))
    checks = {
        "mappings": lambda tp: _check_mappings(rank, tp),
        "column_row": lambda tp: _check_column_row_pair(rank, tp, False),
        "column_row_sp": lambda tp: _check_column_row_pair(rank, tp, True),
        "embedding": lambda tp: _check_embedding(rank, tp, False),
        "embedding_sp": lambda tp: _check_embedding(rank, tp, True),
        "cross_entropy": lambda tp: _check_cross_entropy(rank, tp),
        "llama": lambda tp: _check_llama(rank, ctx, False),
        "llama_sp": lambda tp: _check_llama(rank, ctx, True),
        # vocab 100 padded to 128: the second shard holds ids 64..99 and 28 padding rows
        "llama_padded": lambda tp: _check_llama(rank, ctx, True, vocab=100, divisor=128, tie=False),
        # vocab 64 padded to 128, tied: the second shard is padding only
        "llama_padded_tied": lambda tp: _check_llama(rank, ctx, False, vocab=64, divisor=128, tie=True),
    }
    failures = {}
    for name, check in checks.items():
        try:
            check(Group("tp", ctx.group("tp"), 2, ctx.tp_rank, CommLedger()))
        except Exception:  # report per check; the ranks stay in step since checks are symmetric
            failures[name] = traceback.format_exc()
    return failures


@pytest.fixture(scope="module")
def two_rank_failures():
    from tests.distributed import run_distributed

    per_rank = run_distributed(_two_rank_checks, 2, timeout=120)
    return {name: f"rank {r}: {tb}" for r, failures in enumerate(per_rank) for name, tb in failures.items()}


@pytest.mark.parametrize("check", [
    "mappings",       # f, g and the sequence all-gather / reduce-scatter / scatter, forward and backward
    "column_row",     # ColumnParallelLinear -> RowParallelLinear equals the dense pair
    "column_row_sp",  # the same on sequence shards
    "embedding",      # VocabParallelEmbedding equals nn.Embedding
    "embedding_sp",
    "cross_entropy",  # vocab-parallel CE (z-loss, mask) equals lm_loss without gathering logits
    "llama",          # LLAMA_TP_PLAN: loss, every gathered gradient, grad norm (QK-norm, tied embeddings)
    "llama_sp",
    "llama_padded",       # model.make_vocab_size_divisible_by: tp2 equals tp1, padding rows get no gradient
    "llama_padded_tied",
])
def test_two_rank_tensor_parallel_matches_single_rank(check, two_rank_failures):
    assert check not in two_rank_failures, two_rank_failures[check]

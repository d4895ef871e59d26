"""The Llama decoder: shapes, GQA, layout-invariant init, recompute, loss, bf16."""
import dataclasses

import pytest
import torch

from engine.config import ModelConfig, OptimConfig
from engine.model.decoder import (LlamaModel, count_parameters, init_parameters, lm_loss, rope_cos_sin,
                          rope_inv_freq)
from engine.train.optim import build_optimizer

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                   vocab_size=64, seq_length=16)


def _model(seed=0, **overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    model = LlamaModel(cfg)
    init_parameters(model, seed)
    return model


def _batch(cfg, b=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _mean_loss(model, x, y):
    loss_sum, count = lm_loss(model(x), y, model.cfg.z_loss_weight)
    return loss_sum / count


def test_forward_shapes_logits_and_hidden_states():
    model = _model()
    x, _ = _batch(model.cfg)
    assert model(x).shape == (2, 16, 64)
    trunk = LlamaModel(model.cfg, post_process=False)
    assert trunk(x).shape == (2, 16, 32)
    tail = LlamaModel(model.cfg, pre_process=False)
    assert tail(torch.randn(2, 16, 32)).shape == (2, 16, 64)


def test_pipeline_stages_compose_to_the_full_model():
    model = _model(seed=5)
    first = LlamaModel(model.cfg, layer_ids=[0], post_process=False)
    last = LlamaModel(model.cfg, layer_ids=[1], pre_process=False)
    init_parameters(first, 5)
    init_parameters(last, 5)
    x, _ = _batch(model.cfg)
    torch.testing.assert_close(last(first(x)), model(x), rtol=0, atol=0)


def test_gqa_projection_shapes_and_equivalence_to_repeated_kv_heads():
    model = _model(num_heads=4, num_kv_heads=1)
    attn = model.layers["0"].self_attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (8, 32)
    # Same weights with the single KV head repeated for every query head: identical output.
    mha_cfg = dataclasses.replace(model.cfg, num_kv_heads=4)
    mha = LlamaModel(mha_cfg)
    state = {k: (v.repeat(4, 1) if k.endswith(("k_proj.weight", "v_proj.weight")) else v)
             for k, v in model.state_dict().items()}
    mha.load_state_dict(state)
    x, _ = _batch(model.cfg)
    torch.testing.assert_close(mha(x), model(x), rtol=1e-5, atol=1e-6)


def test_attention_uses_local_head_counts_from_sharded_weights():
    model = _model()
    attn = model.layers["0"].self_attn
    x = torch.randn(2, 16, 32)
    cos, sin = rope_cos_sin(torch.arange(16), model.inv_freq)
    # Keep the first query head group and its KV head, as TP rank 0 of 2 would.
    for proj, rows in ((attn.q_proj, 16), (attn.k_proj, 8), (attn.v_proj, 8)):
        proj.weight = torch.nn.Parameter(proj.weight[:rows].clone())
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, :16].clone())
    assert attn(x, cos, sin).shape == (2, 16, 32)


def test_positions_default_to_arange_and_only_relative_positions_matter():
    model = _model(init_std=0.2)  # attention far from uniform, so positions show
    x, _ = _batch(model.cfg)
    torch.testing.assert_close(model(x, torch.arange(16)), model(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.arange(16) + 3), model(x), rtol=1e-4, atol=1e-5)
    gapped = torch.cat([torch.arange(8), torch.arange(8) + 20])
    assert not torch.allclose(model(x, gapped), model(x), atol=1e-3)


def test_llama3_rope_scaling_divides_low_frequencies_by_factor():
    plain = rope_inv_freq(16, 500000.0)
    scaled = rope_inv_freq(16, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position=64))
    assert scaled[0] == plain[0]  # wavelength 2*pi < 64/4: untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)


def test_qk_norm_adds_per_head_norms_and_runs():
    model = _model(qk_norm=True)
    names = dict(model.named_parameters())
    assert names["layers.0.self_attn.q_norm.weight"].shape == (8,)
    x, y = _batch(model.cfg)
    _mean_loss(model, x, y).backward()
    assert names["layers.0.self_attn.q_norm.weight"].grad is not None


def test_tied_embeddings_share_storage():
    model = _model(tie_embeddings=True)
    assert model.lm_head is None
    assert model.output_weight().data_ptr() == model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in model.state_dict()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"qk_norm": True}])
def test_count_parameters_matches_the_module(overrides):
    model = _model(**overrides)
    assert model.num_parameters() == count_parameters(model.cfg)
    assert model.num_parameters(embedding=False) == count_parameters(model.cfg, embedding=False)


def test_init_depends_only_on_seed_and_name():
    full = dict(_model(seed=7).named_parameters())
    stage = LlamaModel(TINY, layer_ids=[1], pre_process=False)
    init_parameters(stage, 7)
    stage_params = dict(stage.named_parameters())
    assert set(stage_params) == {n for n in full if n.startswith("layers.1.") or n in ("norm.weight", "lm_head.weight")}
    for name, p in stage_params.items():
        assert torch.equal(p, full[name]), name
    other_seed = dict(_model(seed=8).named_parameters())
    assert not torch.equal(other_seed["layers.1.mlp.up_proj.weight"], full["layers.1.mlp.up_proj.weight"])


def test_init_scales_output_projections_and_sets_norms_to_one():
    model = _model(num_layers=8, hidden_size=64, ffn_hidden_size=128, init_std=0.02)
    params = dict(model.named_parameters())
    assert params["layers.3.mlp.up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["layers.3.mlp.down_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(params["layers.3.input_layernorm.weight"], torch.ones(64))


def test_tp_shard_gets_its_slice_of_the_full_parameter():
    full = dict(_model(seed=3).named_parameters())
    shard_model = LlamaModel(TINY)
    q = shard_model.layers["0"].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.empty(16, 32))
    q.weight.tp_shard = (0, 1, 2)
    o = shard_model.layers["0"].self_attn.o_proj
    o.weight = torch.nn.Parameter(torch.empty(32, 16))
    o.weight.tp_shard = (1, 0, 2)
    init_parameters(shard_model, 3)
    assert torch.equal(q.weight, full["layers.0.self_attn.q_proj.weight"][16:])
    assert torch.equal(o.weight, full["layers.0.self_attn.o_proj.weight"][:, :16])


def test_tied_lm_head_of_a_last_stage_starts_equal_to_the_embedding():
    full = _model(seed=4, tie_embeddings=True)
    last = LlamaModel(full.cfg, layer_ids=[1], pre_process=False)
    init_parameters(last, 4)
    assert torch.equal(last.lm_head.weight, full.embed_tokens.weight)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_identical_loss_and_grads(mode):
    base = _model(seed=1)
    other = _model(seed=1, recompute=mode)
    x, y = _batch(base.cfg)
    loss_a, loss_b = _mean_loss(base, x, y), _mean_loss(other, x, y)
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == loss_b.item()
    for (name, a), b in zip(base.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)


def test_lm_loss_matches_cross_entropy_and_z_loss_and_mask():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    loss_sum, count = lm_loss(logits, targets)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1), reduction="sum")
    torch.testing.assert_close(loss_sum, ce)
    assert count.item() == 10
    z_sum, _ = lm_loss(logits, targets, z_loss_weight=1e-2)
    torch.testing.assert_close(z_sum, ce + 1e-2 * torch.logsumexp(logits, -1).square().sum())
    mask = torch.zeros(2, 5)
    mask[0, :3] = 1
    masked_sum, masked_count = lm_loss(logits, targets, loss_mask=mask)
    ce3 = torch.nn.functional.cross_entropy(logits[0, :3], targets[0, :3], reduction="sum")
    torch.testing.assert_close(masked_sum, ce3)
    assert masked_count.item() == 3


def test_loss_decreases_over_adamw_steps_on_a_repeated_batch():
    model = _model(seed=2)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    x, y = _batch(model.cfg)
    losses = []
    for _ in range(8):
        loss = _mean_loss(model, x, y)
        loss.backward()
        opt.step(1e-2)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_bf16_model_runs_forward_and_backward_in_bf16():
    model = _model(seed=2, z_loss_weight=1e-4).to(torch.bfloat16)
    x, y = _batch(model.cfg)
    logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = _mean_loss(model, x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    fp32_loss = _mean_loss(_model(seed=2, z_loss_weight=1e-4), x, y)
    assert abs(loss.item() - fp32_loss.item()) < 0.05


def test_the_blockwise_loss_is_the_same_at_the_gpu_block_size(monkeypatch):
    """The GPU's few large blocks (CE_BLOCK_ELEMENTS['cuda']) give the CPU's many small ones' loss
    and gradient bit for bit (rows are independent); the perf model prices the same block size."""
    import engine.model.decoder as decoder
    from engine.perf.inputs import Assumptions

    assert Assumptions().cross_entropy_block_elements == decoder.CE_BLOCK_ELEMENTS["cuda"]
    vocab, rows = 4096, 1500
    assert decoder.ce_block_rows(vocab, "cuda") == 2**27 // vocab and decoder.ce_block_rows(vocab) == 512
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    results = []
    for elements in (decoder.CE_BLOCK_ELEMENTS["cpu"], decoder.CE_BLOCK_ELEMENTS["cuda"]):
        monkeypatch.setitem(decoder.CE_BLOCK_ELEMENTS, "cpu", elements)
        x = logits.clone().requires_grad_()
        loss, _ = decoder.lm_loss(x, targets)
        loss.backward()
        results.append((loss, x.grad))
    (small, small_grad), (large, large_grad) = results
    assert torch.equal(small, large) and torch.equal(small_grad, large_grad)

"""The MoE layer (engine/model/moe.py) on one rank: routing, dropless expert math and the balance loss."""
import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model.decoder import LlamaModel, count_parameters, init_parameters
from engine.model.moe import MoE, set_aux_loss_scale

CFG = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                  vocab_size=64, seq_length=16, num_experts=4, moe_topk=2, moe_aux_loss_coeff=0.0)


def _moe(cfg=CFG, seed=0) -> MoE:
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return moe


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k renormalised, weighted sum of SwiGLU experts."""
    ffn = moe.gate_proj.rows
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = (moe.router.weight @ x[t]).softmax(-1)
        top_p, top_e = probs.topk(moe.topk)
        for p, e in zip(top_p / top_p.sum(), top_e.tolist()):
            gate = moe.gate_proj.weight[e * ffn:(e + 1) * ffn]
            up = moe.up_proj.weight[e * ffn:(e + 1) * ffn]
            down = moe.down_proj.weight[e * moe.down_proj.rows:(e + 1) * moe.down_proj.rows]
            out[t] += p * (down @ (F.silu(gate @ x[t]) * (up @ x[t])))
    return out


def test_forward_equals_token_by_token_reference():
    moe = _moe()
    x = torch.randn(2, 8, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(x), _reference(moe, x.view(-1, CFG.hidden_size)).view_as(x), rtol=1e-4, atol=1e-5)


def test_gradients_equal_reference_gradients():
    moe = _moe()
    ref = _moe()
    x = torch.randn(2, 8, CFG.hidden_size, generator=torch.Generator().manual_seed(2))
    g = torch.randn_like(x)
    moe(x).backward(g)
    _reference(ref, x.view(-1, CFG.hidden_size)).view_as(x).backward(g)
    for (name, a), b in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_balance_loss_value_and_gradient():
    """Aux loss = coeff * sum_t sum_e f_e p_te / N; coeff for a uniform router; its gradient reaches the router."""
    cfg = ModelConfig(**{**CFG.__dict__, "moe_aux_loss_coeff": 0.5})
    moe = _moe(cfg)
    x = torch.randn(3, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    probs, _, top_e = moe.route(x.view(-1, cfg.hidden_size))
    aux = moe.aux_loss(probs, top_e, batch=3)
    # By hand, sequence by sequence.
    expected = 0.0
    for s in range(3):
        counts = torch.bincount(top_e.view(3, -1)[s], minlength=cfg.num_experts).float()
        f = counts * cfg.num_experts / (cfg.moe_topk * 8)
        expected += (probs.view(3, 8, -1)[s] * f).sum()
    torch.testing.assert_close(aux, expected)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: every f_e averages to 1
    probs, _, top_e = moe.route(x.view(-1, cfg.hidden_size))
    torch.testing.assert_close(moe.aux_loss(probs, top_e, batch=3) / 24, torch.tensor(1.0))
    # The layer's backward adds coeff / N * d(aux)/d(router) to the router's gradient.
    moe = _moe(cfg)
    set_aux_loss_scale([moe], global_tokens=24)
    moe(x).sum().backward()
    with_aux = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_coeff = 0.0
    moe(x).sum().backward()
    moe.zero_grad()
    probs, _, top_e = moe.route(x.view(-1, cfg.hidden_size))
    (0.5 / 24 * moe.aux_loss(probs, top_e, batch=3)).backward()
    aux_only = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe(x).sum().backward()
    torch.testing.assert_close(with_aux, moe.router.weight.grad + aux_only, rtol=1e-4, atol=1e-6)


def test_model_with_experts_trains_and_counts_parameters():
    cfg = ModelConfig(**{**CFG.__dict__, "moe_aux_loss_coeff": 1e-2})
    model = LlamaModel(cfg)
    init_parameters(model, seed=5)
    assert model.num_parameters() == count_parameters(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    set_aux_loss_scale([model], global_tokens=tokens[:, 1:].numel())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_init_is_layout_invariant_per_expert():
    """Expert weights are drawn as one [E * ffn, h] tensor per name: the same with any expert count split."""
    a, b = LlamaModel(CFG), LlamaModel(CFG)
    init_parameters(a, seed=3)
    init_parameters(b, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    down = a.layers["0"].mlp.down_proj.weight
    assert down.std() < a.layers["0"].mlp.gate_proj.weight.std()  # output projections are scaled down


def test_trainer_logs_the_balance_loss_per_layer():
    """A uniform router (zero weights) balances perfectly: the logged loss is exactly the coefficient."""
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from tests.parity import FakeData, parity_config

    cfg = parity_config(["model.num_experts=4", "model.moe_topk=2", "model.moe_aux_loss_coeff=0.01"], 1, 2)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if name.endswith("router.weight"):
                p.zero_()
    first = trainer.train_step(0)
    assert first.load_balancing_loss == pytest.approx(0.01, rel=1e-6)
    assert trainer.record(first)["load_balancing_loss"] == first.load_balancing_loss
    second = trainer.train_step(1)  # the router has learnt something: no longer exactly uniform
    assert second.load_balancing_loss != first.load_balancing_loss and second.load_balancing_loss > 0

"""Learning-rate schedules and the master-weight AdamW optimizer."""
import copy
import math

import pytest
import torch
from torch import nn

from engine.config import OptimConfig
from engine.train.optim import MasterWeightOptimizer, build_optimizer, lr_at


def _cfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    base.update(kw)
    return OptimConfig(**base)


# ---------------------------------------------------------------------------------------------
# Schedules


def test_warmup_is_linear_and_monotone_up_to_the_peak():
    cfg = _cfg()
    lrs = [lr_at(s, cfg, 100) for s in range(11)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5)
    assert lrs[9] == 1.0 and lrs[10] == 1.0


def test_cosine_midpoint_and_end_at_min_lr():
    cfg = _cfg()
    assert lr_at(10 + 45, cfg, 100) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(500, cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_decay_steps_setting():
    cfg = _cfg(decay_steps=20)
    assert lr_at(20, cfg, 100) == pytest.approx(0.55)
    assert lr_at(30, cfg, 100) == pytest.approx(0.1) and lr_at(60, cfg, 100) == pytest.approx(0.1)


def test_wsd_plateau_is_exact_and_decay_starts_at_80_percent():
    cfg = _cfg(schedule="wsd")
    assert all(lr_at(s, cfg, 100) == 1.0 for s in range(9, 80))
    assert lr_at(90, cfg, 100) == pytest.approx(0.55)  # linear by default
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_wsd_decay_start_is_settable_for_branching():
    cfg = _cfg(schedule="wsd", wsd_decay_start=40)
    assert lr_at(39, cfg, 100) == 1.0
    assert lr_at(70, cfg, 100) == pytest.approx(0.55)
    # A branch decaying from step 40 agrees with the main run up to the branch point.
    main = _cfg(schedule="wsd")
    assert [lr_at(s, cfg, 100) for s in range(41)] == [lr_at(s, main, 100) for s in range(41)]


@pytest.mark.parametrize("style, shape", [
    ("linear", lambda t: 1 - t),
    ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
    ("sqrt", lambda t: 1 - math.sqrt(t)),
])
def test_wsd_decay_styles(style, shape):
    cfg = _cfg(schedule="wsd", wsd_decay_style=style)
    for step in (80, 85, 91, 99, 100):
        t = (step - 80) / 20
        assert lr_at(step, cfg, 100) == pytest.approx(0.1 + 0.9 * shape(t))


def test_constant_after_warmup():
    cfg = _cfg(schedule="constant")
    assert lr_at(4, cfg, 100) == pytest.approx(0.5)
    assert {lr_at(s, cfg, 100) for s in range(9, 200)} == {1.0}


# ---------------------------------------------------------------------------------------------
# Optimizer


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(8))


def _model(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


def _set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_fp32_matches_torch_adamw_with_the_same_param_groups():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.0)
    ours_model, ref_model = _model(), _model()
    ours = build_optimizer(ours_model, cfg)
    ref = torch.optim.AdamW([
        {"params": [ref_model.proj.weight], "weight_decay": 0.1},
        {"params": [ref_model.proj.bias, ref_model.norm_weight], "weight_decay": 0.0},
    ], lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for step in range(5):
        _set_grads(ours_model, step)
        _set_grads(ref_model, step)
        ours.step(1e-2)
        ref.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours.master_params["proj.weight"] is ours_model.proj.weight


def test_no_weight_decay_on_norms_and_biases():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, OptimConfig(weight_decay=0.5, clip_grad=0.0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(0.1)
    torch.testing.assert_close(model.proj.weight, before["proj.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(model.norm_weight, before["norm_weight"])
    assert torch.equal(model.proj.bias, before["proj.bias"])


def test_clipping_matches_torch_clip_grad_norm():
    model, ref = _model(), _model()
    _set_grads(model, 1)
    _set_grads(ref, 1)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.grad.mul_(10.0)
    opt = build_optimizer(model, OptimConfig(clip_grad=1.0))
    clipped = {}
    # Capture the gradients AdamW would see (the optimizer drops .grad after its step).
    opt.optimizer.step = lambda: clipped.update((n, m.grad.clone()) for n, m in opt.master_params.items())
    norm = opt.step(1e-3)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1.0)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(clipped[name], p.grad, rtol=1e-6, atol=0)


def test_grad_norm_reduce_hook_sees_the_local_square_and_sets_the_norm():
    model = _model()
    _set_grads(model, 2)
    local = sum(p.grad.pow(2).sum() for p in model.parameters())
    seen = []
    opt = build_optimizer(model, OptimConfig(clip_grad=0.0))
    norm = opt.step(1e-3, grad_norm_sq_reduce=lambda sq: seen.append(sq) or sq * 4)
    torch.testing.assert_close(seen[0], local)
    assert norm == pytest.approx(2 * local.sqrt().item(), rel=1e-6)


def test_bf16_params_step_fp32_masters_that_keep_tiny_updates():
    model = _model().to(torch.bfloat16)
    with torch.no_grad():
        model.proj.weight.fill_(1.0)
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0, clip_grad=0.0))
    master = opt.master_params["proj.weight"]
    assert master.dtype == torch.float32 and model.proj.weight.dtype == torch.bfloat16
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step(1e-4)  # Adam's first steps move each weight by ~lr
    # 1 - 3e-4 rounds to 1.0 in bf16 (spacing 2^-8 below 1): only the master remembers.
    torch.testing.assert_close(master, torch.full_like(master, 1 - 3e-4), rtol=0, atol=1e-6)
    assert torch.equal(model.proj.weight, torch.ones_like(model.proj.weight))
    assert torch.equal(model.proj.weight, master.to(torch.bfloat16))


def test_main_grad_is_preferred_and_zero_grad_clears_it():
    model = _model()
    for p in model.parameters():
        p.main_grad = torch.ones(p.shape)
        p.grad = torch.full(p.shape, 100.0)  # must be ignored
    opt = build_optimizer(model, OptimConfig(clip_grad=0.0))
    norm = opt.step(1e-3)
    assert norm == pytest.approx(math.sqrt(sum(p.numel() for p in model.parameters())))
    opt.zero_grad()
    assert all(p.grad is None and not p.main_grad.any() for p in model.parameters())


def test_non_finite_grad_norm_skips_the_update():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    _set_grads(model, 0)
    model.proj.weight.grad[0, 0] = float("nan")
    opt = build_optimizer(model, OptimConfig())
    assert math.isnan(opt.step(1e-2))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_state_dict_round_trip_continues_identically():
    cfg = OptimConfig(lr=1e-2, clip_grad=0.5)
    a_model = _model().to(torch.bfloat16)
    a = build_optimizer(a_model, cfg)
    _set_grads(a_model, 0)
    a.step(1e-2)
    b_model = _model(seed=1).to(torch.bfloat16)
    b = MasterWeightOptimizer(b_model.named_parameters(), cfg)
    b_model.load_state_dict(a_model.state_dict())
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for opt, model in ((a, a_model), (b, b_model)):
        _set_grads(model, 1)
        opt.step(1e-2)
    for name, master in a.master_params.items():
        assert torch.equal(master, b.master_params[name]), name
    assert set(a.state_dict()["state"]) == {"proj.weight", "proj.bias", "norm_weight"}


def test_counts_in_norm_leaves_replicated_copies_out_of_the_norm():
    model = _model()
    _set_grads(model, 3)
    expected = model.proj.weight.grad.norm().item()
    opt = build_optimizer(model, OptimConfig(clip_grad=0.0), counts_in_norm=lambda name, p: name == "proj.weight")
    assert opt.step(1e-3) == pytest.approx(expected, rel=1e-6)


def test_sync_masters_after_loading_weights_into_a_bf16_model():
    model = _model().to(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig())
    with torch.no_grad():
        model.proj.weight.fill_(0.5)
    opt.sync_masters_from_params()
    assert torch.equal(opt.master_params["proj.weight"], torch.full((8, 8), 0.5))


def test_a_skipped_non_finite_step_leaves_no_grad_alias_behind():
    """Regression: an early return on an inf grad norm left master.grad aliasing main_grad, so the
    next backward accumulated into the buffer in place and the next step's gradient was doubled."""
    from parallel.collectives import CommLedger, Group
    from parallel.data_parallel import GradBuffer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    grads = GradBuffer(model.named_parameters(), Group("dp", None, 1, 0, CommLedger()))
    opt = MasterWeightOptimizer(model.named_parameters(), OptimConfig(lr=0.1, warmup_steps=0))
    x = torch.randn(5, 4)
    grads.start_step()
    model(x).sum().backward()
    grads.finish()
    model.weight.main_grad[0, 0] = float("inf")
    before = model.weight.detach().clone()
    assert not math.isfinite(opt.step(0.1))
    assert torch.equal(model.weight, before) and model.weight.grad is None
    grads.start_step()
    model(x).sum().backward()
    grads.finish()
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    reference(x).sum().backward()
    assert torch.equal(model.weight.main_grad, reference.weight.grad)

"""fp8 delayed scaling (engine/model/precision.py): the quantisation, the GEMM emulation, the scale
updates of TE's recipe, and training with it on one rank and across layouts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.model.precision import (E4M3, E5M2, FP8_MAX, Fp8Linear, Fp8LinearMeta, Fp8Recipe, fp8_linear, quantize)
from tests.parity import assert_matches_reference, max_relative_loss_diff, train_named_layouts


def test_quantize_saturates_and_rounds_to_the_format():
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.30078125, 3e-3])
    q = quantize(x, torch.tensor(1.0), E4M3)
    assert q.dtype == E4M3
    assert q.float().tolist()[:3] == [448.0, -448.0, 1.0]
    assert q.float()[3] == 0.3125  # 3 mantissa bits: 0.30078125 rounds to 0.3125 (nearest even)
    assert q.float()[4] == 2 ** -8  # E4M3 subnormals are multiples of 2^-9: 3e-3 rounds to 2 * 2^-9
    assert quantize(torch.tensor([1e5]), torch.tensor(1.0), E5M2).float().item() == FP8_MAX[E5M2]


def _exact_reference(x, w, g, meta):
    """The fp8 GEMMs in float64 from hand-quantised operands (what an fp8 tensor core computes)."""
    sx, sw, sg = (m.scale.double() for m in meta.roles())
    qx = quantize(x, meta.input.scale, E4M3).double() / sx
    qw = quantize(w, meta.weight.scale, E4M3).double() / sw
    qg = quantize(g, meta.grad_output.scale, E5M2).double() / sg
    return qx @ qw.t(), qg @ qw, qg.flatten(0, -2).t() @ qx.flatten(0, -2)


def test_fp8_linear_is_the_fp8_gemm_up_to_output_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(24, 32, generator=gen) * 0.1).to(torch.bfloat16).requires_grad_()
    g = (torch.randn(2, 16, 24, generator=gen) * 1e-3).to(torch.bfloat16)
    meta = Fp8LinearMeta()
    meta.input.scale, meta.weight.scale, meta.grad_output.scale = (torch.tensor(v) for v in (64.0, 1024.0, 3e6))
    y = fp8_linear(x, w, meta)
    y.backward(g)
    ref_y, ref_dx, ref_dw = _exact_reference(x.detach(), w.detach(), g, meta)
    for got, ref in ((y, ref_y), (x.grad, ref_dx), (w.grad, ref_dw)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -7, atol=1e-6)  # bf16 rounding of the output
    # The amaxes seen, for the next scale update.
    assert meta.input.amax == x.detach().abs().max().float()
    assert meta.weight.amax == w.detach().abs().max().float()
    assert meta.grad_output.amax == g.abs().max().float()


def test_fp8_linear_stays_close_to_the_bf16_linear_with_good_scales():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    w = (torch.randn(64, 64, generator=gen) * 0.05).to(torch.bfloat16)
    meta = Fp8LinearMeta()
    meta.input.scale = FP8_MAX[E4M3] / x.abs().max().float()
    meta.weight.scale = FP8_MAX[E4M3] / w.abs().max().float()
    y, ref = fp8_linear(x, w, meta).float(), F.linear(x, w).float()
    assert ((y - ref).norm() / ref.norm()).item() < 0.05  # E4M3 keeps 3 mantissa bits


def test_delayed_scaling_update_follows_te():
    """scale = fp8_max / amax_ref / 2^margin; amax_ref = max of the history (or the latest); zero keeps it."""
    recipe = Fp8Recipe(margin=1, amax_history_len=3)
    meta = recipe.metas.setdefault("l", Fp8LinearMeta())
    for amax in (2.0, 8.0, 4.0, 1.0):
        meta.input.amax = torch.tensor(amax)
        meta.grad_output.amax = torch.tensor(0.0)  # never saw a gradient: keeps its scale
        recipe.update()
    assert [h.item() for h in meta.input.history] == [8.0, 4.0, 1.0]  # the oldest (2) rolled out
    assert meta.input.scale.item() == 448.0 / 8.0 / 2.0
    assert meta.grad_output.scale.item() == 1.0
    assert meta.input.amax.item() == 0.0  # restarted for the next step
    latest = Fp8Recipe(amax_compute_algo="most_recent")
    m = latest.metas.setdefault("l", Fp8LinearMeta())
    for amax in (8.0, 2.0):
        m.weight.amax = torch.tensor(amax)
        latest.update()
    assert m.weight.scale.item() == 448.0 / 2.0
    restored = Fp8Recipe(margin=1, amax_history_len=3)
    restored.metas["l"] = Fp8LinearMeta()
    restored.load_state_dict(recipe.state_dict())
    assert restored.state_dict() == recipe.state_dict()


def test_convert_routes_decoder_gemms_only():
    from engine.config import ModelConfig
    from engine.model.decoder import LlamaModel

    model = LlamaModel(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                                   vocab_size=64, seq_length=16))
    names = dict(model.named_parameters())
    converted = Fp8Recipe().convert(model)
    assert len(converted) == 2 * 7
    assert isinstance(model.layers["0"].mlp.down_proj, Fp8Linear)
    assert type(model.lm_head) is nn.Linear  # the head stays bf16, as with TE
    assert dict(model.named_parameters()).keys() == names.keys()  # checkpoints keep their keys


FP8 = ["precision.dtype=fp8"]


FP8_LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def fp8_reference(single_rank):
    return single_rank.reference(FP8, 20), single_rank.reference(["precision.dtype=bf16"], 20)


def test_fp8_training_follows_the_bf16_curve(fp8_reference):
    fp8, bf16 = fp8_reference
    assert fp8.losses[-1] < fp8.losses[0] - 0.5
    # Step 0 runs at the initial scale 1 (its small gradients underflow E5M2, as with TE); from
    # then on the delayed scales track the amaxes and the curve stays within a few percent.
    assert max_relative_loss_diff(fp8.losses[1:], bf16.losses[1:]) < 0.05


@pytest.fixture(scope="module")
def fp8_layouts():
    """Every fp8 layout trained once, in one 2-rank spawn."""
    return train_named_layouts({2: {name: [*FP8, *overrides] for name, overrides in FP8_LAYOUTS.items()}}, 20)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
def test_fp8_layouts_reproduce_the_single_rank_curve(layout, fp8_layouts, fp8_reference, single_rank):
    """With amaxes reduced over TP and DP ranks every layout uses the single-rank scales; what remains
    is fp32-rounding noise moved across fp8 rounding boundaries, which the fp8 floor (the fp8
    single-rank run reordered, tests/noise_floor.py) shows too."""
    tolerance = single_rank.tolerance(FP8, 20, layout=FP8_LAYOUTS[layout])
    assert_matches_reference(f"fp8 {layout}", fp8_layouts[layout], fp8_reference[0], tolerance)


def test_fp8_resume_is_bitwise_identical(tmp_path):
    """The scales and amax histories travel in the checkpoint: a resumed run continues bit for bit."""
    from tests.test_checkpoint import _new_run_dir, _run

    overrides = [*FP8, "checkpoint.interval=3"]
    clean, clean_state, _ = _run(1, overrides, 6, _new_run_dir(tmp_path, "clean"))
    run_dir = _new_run_dir(tmp_path, "crashy")
    _run(1, overrides, 6, run_dir, 5)  # crash after step 5: resumes from step 3
    resumed, state, start = _run(1, overrides, 6, run_dir)
    assert start == 3
    assert [resumed[s] for s in range(3, 6)] == [clean[s] for s in range(3, 6)]
    assert all((state[k] == v).all() for k, v in clean_state.items())

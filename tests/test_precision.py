"""fp8 numerics (engine/model/fp8/): the scale rules against hand-computed values, every recipe's
emulated GEMMs against an fp64 reference of its quantised operands, delayed scaling's update as
Transformer Engine's, which GEMMs convert, and no host sync on the per-GEMM path."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine.model.fp8.emulation import Fp8Linear, convert_to_emulation, fp8_layer_names, fp8_linear
from engine.model.fp8.quantize import (E4M3, E5M2, FP8_MAX, decode, e8m0_exponent, e8m0_scales, quantize,
                                       quantize_blocks, quantize_mx, scale_from_amax)
from engine.model.fp8.recipes import RECIPES, DelayedScalingState, Fp8Recipe, RecipeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.30078125, 3e-3, 0.28125])
    q = quantize(x, torch.tensor(1.0), E4M3)
    assert q.dtype == E4M3
    assert q.float().tolist()[:3] == [448.0, -448.0, 1.0]
    assert q.float()[3] == 0.3125  # 3 mantissa bits: 0.30078125 rounds to 0.3125
    assert q.float()[4] == 2 ** -8  # E4M3 subnormals are multiples of 2^-9: 3e-3 rounds to 2 * 2^-9
    assert q.float()[5] == 0.28125  # representable: 1.125 * 2^-2
    assert quantize(torch.tensor([0.265625]), torch.tensor(1.0), E4M3).float().item() == 0.25  # tie -> even
    assert quantize(torch.tensor([1e5]), torch.tensor(1.0), E5M2).float().item() == FP8_MAX[E5M2]


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_decoding_by_lookup_is_bitwise_torch_s_conversion(fp8):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).reshape(16, 16).t()  # non-contiguous
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        assert torch.equal(decode(codes, dtype).view(bits), codes.to(dtype).view(bits))  # nan payloads too


def test_scale_from_amax_follows_te_by_hand():
    amax = torch.tensor([3.0, 448.0, 0.0, float("inf"), float("nan"), 1e-45])
    scale = scale_from_amax(amax, 448.0)
    assert scale[0] == torch.tensor(448.0 / 3.0, dtype=torch.float32)  # fp32 division, round to nearest
    assert scale[1] == 1.0
    assert scale[2:5].tolist() == [1.0, 1.0, 1.0]  # zero, inf, nan amax: scale 1
    assert scale[5] == torch.finfo(torch.float32).max  # 448 / 1e-45 overflows: the largest finite scale
    power_2 = scale_from_amax(amax, 448.0, power_2=True)
    assert power_2[0] == 128.0  # 149.33 rounded down to a power of two
    assert power_2[5] == 2.0 ** 127
    assert scale_from_amax(torch.tensor(1e-3), 448.0, epsilon=1.0) == 448.0  # amax floored at epsilon


def test_mxfp8_scales_round_the_exponent_up_as_te():
    """float_to_e8m0(amax / 448): the block's largest element never saturates (the OCP example rule,
    2^(floor(log2 amax) - 8), would put amax=480 at scale 1 and clip it to 448)."""
    amax = torch.tensor([448.0, 449.0, 500.0, 1.0, 0.0, float("inf"), float("nan")])
    exponent = e8m0_exponent(amax, 448.0)
    assert exponent.tolist() == [127, 128, 128, 119, 0, 254, 255]
    scale, scale_inv = e8m0_scales(exponent)
    assert scale_inv[:5].tolist() == [1.0, 2.0, 2.0, 2.0 ** -8, 2.0 ** -127]
    assert scale[3] == 256.0 and scale[4] == 2.0 ** 127 and math.isnan(scale_inv[6])
    block = torch.zeros(1, 32)
    block[0, :3] = torch.tensor([480.0, 3.0, -1.0])
    q = quantize_mx(block, E4M3)
    assert q.scale_inv.tolist() == [[2.0]] and q.data.float()[0, :3].tolist() == [240.0, 1.5, -0.5]


def test_block_scales_are_per_tile_by_hand():
    x = torch.zeros(2, 256)
    x[0, 5], x[0, 200], x[1, 0] = 3.5, -0.25, 7.0
    q = quantize_blocks(x, 1, 128, E4M3)
    expected = [[3.5 / 448, 0.25 / 448], [7.0 / 448, 1.0]]  # an all-zero tile keeps scale 1
    assert torch.equal(q.scale_inv, torch.tensor([[448 / 3.5, 448 / 0.25], [448 / 7.0, 1.0]]).reciprocal())
    torch.testing.assert_close(q.scale_inv, torch.tensor(expected), rtol=1e-7, atol=0)
    assert q.data.float()[0, 5] == 448.0 and q.data.float()[0, 200] == -448.0
    w = torch.zeros(256, 128)
    w[130, 3] = 2.0
    blocks = quantize_blocks(w, 128, 128, E4M3)
    assert blocks.scale_inv.shape == (2, 1) and blocks.scale_inv[0, 0] == 1.0
    assert blocks.scale_inv[1, 0] == torch.tensor(448 / 2.0).reciprocal()
    assert torch.equal(blocks.t().dequantize(), blocks.dequantize().t())  # square blocks transpose exactly


# ------------------------------------------------------------------ the GEMMs against fp64


def _reference_quantize(x, recipe, role, scale=None, dtype=E4M3):
    """x [m, k] quantised along k by hand, one column of tiles at a time, dequantised in fp64."""
    if recipe in ("delayed", "tensorwise"):
        if scale is None:
            scale = scale_from_amax(x.abs().max(), FP8_MAX[dtype], value_for_inf=torch.finfo(x.dtype).max)
        return quantize(x, scale, dtype).double() * torch.reciprocal(scale).double()  # TE's scale_inv
    out = torch.zeros(x.shape, dtype=torch.float64)
    rows, cols = ((128, 128) if role == "weight" else (1, 128)) if recipe == "blockwise" else (1, 32)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            tile = x[i:i + rows, j:j + cols]
            amax = tile.abs().amax(dim=1, keepdim=True) if rows == 1 else tile.abs().max()
            if recipe == "mxfp8":
                decode = torch.exp2(e8m0_exponent(amax, FP8_MAX[dtype]).double() - 127)
                out[i:i + rows, j:j + cols] = quantize(tile, (1 / decode).float(), dtype).double() * decode
            else:
                tile_scale = scale_from_amax(amax, FP8_MAX[dtype], value_for_inf=torch.finfo(x.dtype).max)
                out[i:i + rows, j:j + cols] = (quantize(tile, tile_scale, dtype).double()
                                               * torch.reciprocal(tile_scale).double())
    return out


def _assert_gemm_close(got, ref, abs_a, abs_b):
    """Within the output's rounding (at most two bf16 roundings, 2^-8 relative each) plus the fp32
    accumulation's worst case over k (k * 2^-23 of the sum of |products|)."""
    k = abs_a.shape[1]
    bound = (2.0 ** -7 + 2.0 ** -16) * ref.abs() + k * 2.0 ** -23 * (abs_a @ abs_b.t())
    excess = ((got.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the rounding bound by {excess:.3e}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_is_the_fp8_gemm_of_its_quantised_operands(recipe):
    """Forward, dgrad and wgrad equal the fp64 GEMMs of the hand-quantised operands (rowwise for the
    contraction along features, columnwise along tokens) up to the output's rounding."""
    gen = torch.Generator().manual_seed(0)
    tokens, k, n = 256, 256, 128
    x = (torch.randn(2, tokens // 2, k, generator=gen) * torch.logspace(-2, 1, k)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).requires_grad_()
    g = (torch.randn(2, tokens // 2, n, generator=gen) * 1e-3).to(torch.bfloat16)
    fp8 = Fp8Recipe(RecipeSettings(recipe))
    quantizers = fp8.quantizers("layer")
    fp8.allocate(torch.device("cpu"))
    forward, backward = RecipeSettings(recipe).dtypes
    if recipe == "delayed":  # scales of past steps, not of these tensors: 1/4 of the ideal, say
        fp8.delayed.scale.copy_(torch.tensor([64.0, 1024.0, 3e6]))
    y = fp8_linear(x, w, quantizers)
    y.backward(g)
    scales = fp8.delayed.scale if recipe == "delayed" else [None] * 3
    x2, g2 = x.detach().reshape(tokens, k), g.reshape(tokens, n)
    qx = _reference_quantize(x2, recipe, "input", scales[0], forward)
    qw = _reference_quantize(w.detach(), recipe, "weight", scales[1], forward)
    qg = _reference_quantize(g2, recipe, "grad", scales[2], backward)
    # Columnwise operands: the transposed tensor quantised along tokens (the same for per-tensor
    # and 128x128 scales, a second quantisation for 1-D blocks).
    qx_t = _reference_quantize(x2.t().contiguous(), recipe, "input", scales[0], forward)
    qw_t = _reference_quantize(w.detach().t().contiguous(), recipe, "weight", scales[1], forward)
    qg_t = _reference_quantize(g2.t().contiguous(), recipe, "grad", scales[2], backward)
    checks = ((y.reshape(tokens, n), qx @ qw.t(), qx, qw), (x.grad.reshape(tokens, k), qg @ qw_t.t(), qg, qw_t),
              (w.grad, qg_t @ qx_t.t(), qg_t, qx_t))
    for got, ref, a, b in checks:
        assert got.dtype == torch.bfloat16
        _assert_gemm_close(got, ref, a.abs(), b.abs())
    if recipe == "delayed":  # the amaxes seen, for the next scale update
        assert fp8.delayed.amax_history[0].tolist() == [x.detach().abs().max().float().item(),
                                                        w.detach().abs().max().float().item(),
                                                        g.abs().max().float().item()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_stays_close_to_the_bf16_linear(recipe):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 256, generator=gen).to(torch.bfloat16)
    w = (torch.randn(128, 256, generator=gen) * 0.05).to(torch.bfloat16)
    fp8 = Fp8Recipe(RecipeSettings(recipe))
    quantizers = fp8.quantizers("l")
    fp8.allocate(torch.device("cpu"))
    if recipe == "delayed":
        fp8.delayed.scale[:2] = torch.stack([448 / x.abs().max().float(), 448 / w.abs().max().float()])
    y, ref = fp8_linear(x, w, quantizers).float(), F.linear(x, w).float()
    error = ((y - ref).norm() / ref.norm()).item()
    print(f"{recipe}: relative error vs bf16 {error:.4f}")
    assert error < 0.05  # E4M3 keeps 3 mantissa bits: a few percent per product, averaging out


def test_delayed_scaling_update_follows_te():
    """scale = fp8_max / 2^margin / amax_ref; amax_ref = the history's max (or row 0); a zero amax
    keeps the scale; the history rolls and row 0 restarts; one reduction of row 0 per update."""
    state = DelayedScalingState(history_len=3, compute_algo="max", margin=1)
    state.add("l", (E4M3, E4M3, E5M2))
    state.allocate(torch.device("cpu"))
    reduced = []
    for amax in (2.0, 8.0, 4.0, 1.0):
        state.amax_history[0, 0] = amax  # input; the weight and the gradient never saw data
        state.update(lambda row: reduced.append(row.clone()))
    assert len(reduced) == 4 and reduced[-1].tolist() == [1.0, 0.0, 0.0]
    assert state.amax_history[:, 0].tolist() == [0.0, 4.0, 1.0]  # row 0 zeroed; 2 and then 8 rolled out
    assert state.scale[0] == 448.0 / 2 / 8.0  # 8 was still in the 3-step window at the last update
    assert state.scale[1:].tolist() == [1.0, 1.0]
    state.amax_history[0, 2] = 1e-42  # an amax so small that 57344 / 2 / amax overflows fp32
    state.update()
    assert state.scale[2] == torch.finfo(torch.float32).max
    latest = DelayedScalingState(history_len=4, compute_algo="most_recent", margin=0)
    latest.add("l", (E4M3, E4M3, E5M2))
    latest.allocate(torch.device("cpu"))
    for amax in (8.0, 2.0):
        latest.amax_history[0, 1] = amax
        latest.update()
    assert latest.scale[1] == 448.0 / 2.0
    views = latest.layer_tensors()
    assert set(views) == {"fp8/l/amax_history", "fp8/l/scale"} and views["fp8/l/amax_history"].shape == (4, 3)
    views["fp8/l/scale"].fill_(3.0)  # views: a checkpoint loads into the live state
    assert latest.scale.tolist() == [3.0, 3.0, 3.0]


def _tiny_model(**overrides):
    from engine.config import ModelConfig
    from engine.model.decoder import LlamaModel

    shape = dict(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, vocab_size=64,
                 seq_length=16)
    return LlamaModel(ModelConfig(**{**shape, **overrides}))


def test_convert_routes_decoder_gemms_only_and_keeps_the_first_and_last_layers_in_bf16():
    model = _tiny_model()
    names = dict(model.named_parameters())
    assert len(fp8_layer_names(model, 4)) == 4 * 7
    chosen = fp8_layer_names(model, 4, first_bf16=1, last_bf16=1)
    assert {int(name.split(".")[1]) for name in chosen} == {1, 2} and len(chosen) == 2 * 7
    recipe = Fp8Recipe(RecipeSettings("delayed"))
    convert_to_emulation(model, chosen, recipe)
    recipe.allocate(torch.device("cpu"))
    assert isinstance(model.layers["1"].mlp.down_proj, Fp8Linear)
    assert type(model.layers["0"].mlp.down_proj) is nn.Linear and type(model.layers["3"].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear  # the head stays bf16, as with TE
    assert dict(model.named_parameters()).keys() == names.keys()  # checkpoints keep their keys
    assert recipe.delayed.amax_history.shape == (1024, 3 * 14)


# ------------------------------------------------------------------ no host sync on the per-GEMM path

FP8_PATH = sorted((ROOT / "engine" / "model" / "fp8").glob("*.py"))
HOST_SYNCS = re.compile(r"\.(cpu|item|tolist)\(")


def test_no_host_sync_is_written_on_the_fp8_path():
    """grep: no .cpu(), .item() or .tolist() anywhere in engine/model/fp8/ (scales, amaxes and
    histories stay tensors on the device)."""
    assert len(FP8_PATH) >= 6
    found = [f"{path.name}:{n}: {line.strip()}" for path in FP8_PATH
             for n, line in enumerate(path.read_text().splitlines(), 1) if HOST_SYNCS.search(line)]
    assert found == []


class _ScalarReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to Python (.item(), float(t), if t: ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_value_is_read_back_during_fp8_gemms_or_the_scale_update(recipe):
    """At run time too: forward, backward and delayed scaling's update read no tensor value into
    Python (no implicit sync such as float(amax) or a branch on a tensor)."""
    fp8 = Fp8Recipe(RecipeSettings(recipe))
    quantizers = fp8.quantizers("l")
    fp8.allocate(torch.device("cpu"))
    x = torch.randn(4, 32, 256).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(128, 256) * 0.05).to(torch.bfloat16).requires_grad_()
    with _ScalarReads() as mode:
        fp8_linear(x, w, quantizers).sum().backward()
        fp8.update(lambda amaxes: amaxes.mul_(1.0))
    assert mode.reads == []
    assert x.grad is not None and w.grad is not None

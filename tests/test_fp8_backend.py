"""Around the Transformer Engine path (engine/model/fp8/backend.py, te.py): which path runs and the
log line that says so, what each recipe asks of the GPU and of the GEMM shapes (refused at config
time with what would work), and the data-parallel hook that lets TE write main_grad itself.
TE itself needs CUDA: its checks are in bench/gpu_checks_fp8.py."""
import types

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.config_validation import validate
from engine.model.fp8.backend import choose_backend, describe, hardware_problem, runs_on
from parallel.collectives import CommLedger, Group
from parallel.data_parallel import GradBuffer


def _importer(module, why=""):
    return lambda: (module, why)


def test_the_emulation_runs_without_cuda_or_without_te_and_te_runs_where_both_are():
    fake_te = types.ModuleType("transformer_engine.pytorch")
    cuda = torch.device("cuda", 0)
    assert choose_backend("auto", torch.device("cpu"), _importer(fake_te)) == (
        "emulation", "the device is cpu; Transformer Engine needs CUDA")
    backend, why = choose_backend("auto", cuda, _importer(None, "ModuleNotFoundError: No module named 'transformer_engine'"))
    assert backend == "emulation" and "does not import (ModuleNotFoundError" in why
    backend, why = choose_backend("auto", cuda, _importer(fake_te))
    assert backend == "te" and why.endswith("on cuda:0")
    assert choose_backend("emulation", cuda, _importer(fake_te))[0] == "emulation"


def test_this_machine_imports_no_te_and_the_emulation_is_chosen_on_cpu():
    """CI runs without Transformer Engine: the real importer reports why, and nothing fails."""
    backend, why = choose_backend("auto", torch.device("cpu"))
    assert backend == "emulation"
    assert describe("blockwise", "e4m3", backend, why) == (
        "fp8 recipe blockwise (e4m3) runs through the PyTorch emulation (exact, not fast): "
        "the device is cpu; Transformer Engine needs CUDA")


def test_the_trainer_logs_which_fp8_path_runs(capsys):
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext
    from tests.parity import FakeData, parity_config

    cfg = parity_config(["precision.dtype=fp8", "precision.fp8_recipe=tensorwise"], 1, 1)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg))
    out = capsys.readouterr().out
    assert "apogee: fp8 recipe tensorwise (hybrid) runs through the PyTorch emulation" in out
    assert trainer.fp8.backend == "emulation" and len(trainer.fp8.converted) == 2 * 7


@pytest.mark.parametrize("capability, cuda, runs", [
    ((8, 0), "12.4", []),                                           # A100: no fp8 tensor cores
    ((8, 9), "12.4", ["delayed", "tensorwise"]),                    # L40S / RTX 4090
    ((9, 0), "12.4", ["delayed", "tensorwise"]),                    # H100 with an older CUDA
    ((9, 0), "12.9", ["delayed", "tensorwise", "blockwise"]),       # H100 / H200
    ((10, 0), "12.9", ["delayed", "tensorwise", "blockwise", "mxfp8"]),  # B200
    ((12, 0), "12.9", ["delayed", "tensorwise", "blockwise"]),      # RTX 50xx: MXFP8 not yet in TE
])
def test_each_recipe_runs_on_the_gpus_transformer_engine_supports(capability, cuda, runs):
    assert [r for r in ("delayed", "tensorwise", "blockwise", "mxfp8") if runs_on(r, capability, cuda)] == runs


def test_a_recipe_the_gpu_cannot_run_is_refused_with_what_would_work():
    problem = hardware_problem("mxfp8", (9, 0), "12.9")
    assert "compute capability 10.x" in problem and "this GPU has compute capability 9.0, CUDA 12.9" in problem
    assert "recipes this GPU runs: delayed, tensorwise, blockwise" in problem
    assert "precision.fp8_backend=emulation" in problem
    assert hardware_problem("blockwise", (9, 0), "12.9") is None
    assert "recipes this GPU runs" not in hardware_problem("delayed", (8, 0), "12.4")


@pytest.mark.parametrize("overrides, world, message", [
    (["precision.fp8_recipe=blockwise"], 1,
     r"precision.fp8_recipe='blockwise': blockwise needs every fp8 GEMM width per tensor-parallel rank a multiple "
     r"of 128 .* self_attn.k_proj 128->64, .*mlp.gate_proj 128->352.*recipes that fit this layout: delayed, "
     r"tensorwise, mxfp8"),
    (["precision.fp8_recipe=mxfp8", "parallel.tp=2"], 2, r"at tp=2 these do not: mlp.gate_proj 128->176"),
    (["precision.fp8_recipe=mxfp8", "train.micro_batch_size=1", "model.seq_length=48", "train.global_batch_size=4"],
     1, r"48 tokens per microbatch and rank"),
    (["precision.fp8_recipe=tensorwise", "precision.fp8_margin=1"], 1,
     r"precision.fp8_margin=1: used by precision.fp8_recipe=delayed only"),
    (["precision.fp8_recipe=blockwise", "precision.fp8_amax_compute_algo=most_recent"], 1,
     r"precision.fp8_amax_compute_algo='most_recent': used by precision.fp8_recipe=delayed only"),
    (["precision.fp8_power_2_scales=true"], 1, r"precision.fp8_power_2_scales=True: tensorwise and blockwise only"),
    (["precision.fp8_first_layers_bf16=2", "precision.fp8_last_layers_bf16=1"], 1,
     r"first \+ last bf16 layers \(3\) exceed model.num_layers=2"),
    (["precision.fp8_recipe=nvfp4"], 1, r"precision.fp8_recipe='nvfp4': expected one of delayed, tensorwise, "
                                        r"blockwise, mxfp8"),
    (["precision.fp8_format=e5m2"], 1, r"precision.fp8_format='e5m2': expected one of hybrid, e4m3"),
    (["precision.fp8_backend=te"], 1, r"precision.fp8_backend='te': expected one of auto, emulation"),
])
def test_fp8_settings_are_checked_before_launch(overrides, world, message):
    cfg = load_config("configs/tiny.yaml", ["precision.dtype=fp8", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_shapes_that_tile_the_blocks_at_tp2_are_accepted():
    aligned = ["model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_heads=4", "model.num_kv_heads=4"]
    for recipe in ("blockwise", "mxfp8"):
        cfg = validate(load_config("configs/tiny.yaml", ["precision.dtype=fp8", f"precision.fp8_recipe={recipe}",
                                                         "parallel.tp=2", *aligned]), 2)
        assert cfg.precision.fp8_recipe == recipe


class _WritesMainGrad(torch.autograd.Function):
    """y = x W^T whose backward accumulates dW into W.main_grad itself and hands autograd a
    placeholder, as Transformer Engine's Linear does with fuse_wgrad_accumulation."""

    @staticmethod
    def forward(ctx, x, weight, first_microbatch):
        ctx.save_for_backward(x, weight)
        ctx.first = first_microbatch
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        wgrad = grad.t() @ x
        if ctx.first:
            weight.main_grad.copy_(wgrad)
        else:
            weight.main_grad.add_(wgrad)
        weight.grad_added_to_main_grad = True
        return grad @ weight, torch.empty_like(weight), None


def test_grad_buffer_keeps_a_gradient_the_layer_wrote_into_main_grad_itself():
    gen = torch.Generator().manual_seed(0)
    fused, plain = (torch.nn.Parameter(torch.randn(3, 4, generator=gen)) for _ in range(2))
    buffer = GradBuffer([("fused", fused), ("plain", plain)], Group("dp", None, 1, 0, CommLedger(), torch.device("cpu")))
    fused.grad_added_to_main_grad = False
    inputs = [torch.randn(5, 4, generator=gen) for _ in range(2)]
    for step in range(2):  # a second step must overwrite, not add to, the first
        buffer.start_step()
        for j, x in enumerate(inputs):
            buffer.is_last_microbatch = j == 1
            (_WritesMainGrad.apply(x, fused, j == 0).sum() + (x @ plain.t()).sum()).backward()
        buffer.finish()
    expected = sum(torch.ones(5, 3).t() @ x for x in inputs)
    torch.testing.assert_close(fused.main_grad, expected)
    torch.testing.assert_close(plain.main_grad, expected)
    assert fused.grad is None and fused.grad_added_to_main_grad is False


def test_the_gpu_checks_skip_cleanly_without_cuda(tmp_path):
    """bench/gpu_checks_fp8.py runs here too: every check reports a skip (and why) and writes its report."""
    import json

    from bench.gpu_checks_fp8 import CHECKS

    for check in CHECKS:
        result = check(tmp_path)
        assert result["status"] == "skip" and result["reason"] == "no CUDA device"
        assert json.loads((tmp_path / f"{result['check']}.json").read_text()) == result

"""GPU checks of fp8 (engine/model/fp8/): each `check_*(report_dir) -> dict` skips cleanly without CUDA
(or without Transformer Engine where it needs it) and writes its result to REPORT_DIR/<name>.json.

    check_fp8_emulation_on_cuda         every recipe's emulation on CUDA: no host sync in the fp8 GEMMs
                                        (torch.cuda.set_sync_debug_mode("error")), step time vs bf16
    check_te_gemm_matches_emulation     per recipe this GPU runs: TE's Linear forward, dgrad and wgrad
                                        against the emulation's on the same operands (a tolerance)
    check_te_training_matches_emulation per recipe: 20 training steps' losses, TE vs the emulation
    check_te_step_time_8b_width         bf16 vs fp8 (TE, per recipe) step time of an 8B-width 4-layer model

A result is {"check", "status": pass | fail | skip, "reason", ...figures}. Run them all with
`python bench/gpu_checks_fp8.py REPORT_DIR`; scripts/gpu-check.sh registers them one by one
(`CHECKS` lists them in the order to run).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from engine.model.fp8.backend import hardware_problem, import_transformer_engine  # noqa: E402
from engine.model.fp8.recipes import RECIPES, Fp8Recipe, RecipeSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALIGNED = ["model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_heads=4", "model.num_kv_heads=4",
           "model.seq_length=128", "model.vocab_size=384", "train.micro_batch_size=4", "train.global_batch_size=4"]
"""A small model whose GEMMs tile 128-blocks; one microbatch per step (TE's delayed update then runs once per step, as the emulation's)."""
WIDE = ["model.hidden_size=4096", "model.num_layers=4", "model.num_heads=32", "model.num_kv_heads=8",
        "model.ffn_hidden_size=14336", "model.vocab_size=32000", "model.seq_length=2048",
        "train.micro_batch_size=1", "train.global_batch_size=1"]
"""Llama-3-8B widths, 4 layers (a smaller vocabulary keeps the head from dominating the step)."""
GEMM_TOLERANCE = 2.0 ** -6
"""TE vs emulation, relative Frobenius error: both quantise the same bf16 operands at the same scales,
so what differs is accumulation (TE's fast fp8 accumulation in fprop, cuBLAS order) and the
emulation's second bf16 rounding (2^-8); 2^-6 leaves room for that and catches any wrong scale
or block (an fp8 rounding-grid error is ~2^-4)."""
LOSS_TOLERANCE = 0.02
"""TE vs emulation over 20 steps, max relative loss difference: GEMM-level differences compound."""


def _result(name: str, report_dir, status: str, reason: str = "", **figures) -> dict:
    result = {"check": name, "status": status, "reason": reason, **figures}
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _skip_reason(needs_te: bool) -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if needs_te:
        te, why = import_transformer_engine()
        if te is None:
            return f"transformer_engine.pytorch does not import ({why})"
    return None


def _runnable(recipe: str) -> Optional[str]:
    """None if TE runs `recipe` on this GPU, else why not."""
    return hardware_problem(recipe, torch.cuda.get_device_capability(), torch.version.cuda)


def _trainer(overrides: list[str], steps: int):
    from engine.config import load_config
    from engine.config_validation import validate
    from engine.train.synthetic_data import SyntheticData
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = validate(load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"train.steps={steps}",
                                                                "logging.tensorboard=false"]), 1)
    return Trainer(cfg, ParallelContext.single(device="cuda"), SyntheticData.for_config(cfg))


def _timed_steps(trainer, warmup: int, timed: int) -> tuple[list[float], float]:
    """(losses, median seconds per step) after `warmup` untimed steps."""
    losses, times = [], []
    for step in range(warmup + timed):
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(trainer.train_step(step).loss)  # .loss reads the loss back: the step is complete
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return losses, statistics.median(times)


def _precision(recipe: Optional[str], backend: str = "auto") -> list[str]:
    if recipe is None:
        return ["precision.dtype=bf16"]
    return ["precision.dtype=fp8", f"precision.fp8_recipe={recipe}", f"precision.fp8_backend={backend}"]


def check_fp8_emulation_on_cuda(report_dir=None) -> dict:
    """Every recipe's emulated fp8 linear runs on CUDA without a host sync; its step time next to bf16's."""
    name = "fp8_emulation_on_cuda"
    reason = _skip_reason(needs_te=False)
    if reason:
        return _result(name, report_dir, "skip", reason)
    from engine.model.fp8.emulation import fp8_linear

    figures, failures = {}, []
    x = torch.randn(8, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(2048, 1024, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    for recipe in RECIPES:
        fp8 = Fp8Recipe(RecipeSettings(recipe))
        quantizers = fp8.quantizers("check")
        fp8.allocate(torch.device("cuda"))
        fp8_linear(x, w, quantizers).sum().backward()  # first call: allocator and kernel warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fp8_linear(x, w, quantizers).sum().backward()
            fp8.update(lambda amaxes: amaxes.mul_(1.0))
        except RuntimeError as err:
            failures.append(f"{recipe}: host sync: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    bf16 = _timed_steps(_trainer([*ALIGNED, *_precision(None)], 13), 3, 10)[1]
    figures["bf16_ms_per_step"] = bf16 * 1e3
    for recipe in RECIPES:
        seconds = _timed_steps(_trainer([*ALIGNED, *_precision(recipe, "emulation")], 13), 3, 10)[1]
        figures[f"{recipe}_emulation_ms_per_step"] = seconds * 1e3
        figures[f"{recipe}_emulation_over_bf16"] = seconds / bf16
    return _result(name, report_dir, "fail" if failures else "pass", "; ".join(failures), **figures)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_te_gemm_matches_emulation(report_dir=None) -> dict:
    """Per recipe this GPU runs: TE Linear's y, dx, dW vs the emulation's on the same operands."""
    name = "te_gemm_matches_emulation"
    reason = _skip_reason(needs_te=True)
    if reason:
        return _result(name, report_dir, "skip", reason)
    import transformer_engine.pytorch as te

    from engine.model.fp8.emulation import fp8_linear
    from engine.model.fp8.te import autocast, te_recipe

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 512, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    g = (torch.randn(4, 512, 2048, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)
    weight = (torch.randn(2048, 1024, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    figures, failures, skipped = {}, [], []
    for recipe in RECIPES:
        if _runnable(recipe):
            skipped.append(recipe)
            continue
        settings = RecipeSettings(recipe)
        layer = te.Linear(1024, 2048, bias=False, params_dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            layer.weight.copy_(weight)
        emulated = Fp8Recipe(settings)
        quantizers = emulated.quantizers("check")
        emulated.allocate(torch.device("cuda"))
        w = weight.clone().requires_grad_()
        recipe_object = te_recipe(settings)  # one object: TE keys delayed scaling's amax buffers by it
        # Two iterations: delayed scaling's second one runs at the scales the first one's amaxes set.
        for _ in range(2):
            xt, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
            layer.weight.grad, w.grad = None, None
            with autocast(te, recipe_object, None):
                yt = layer(xt)
            yt.backward(g)
            ye = fp8_linear(xe, w, quantizers)
            ye.backward(g)
            emulated.update()
        errors = {"y": _relative(yt, ye), "dx": _relative(xt.grad, xe.grad), "dw": _relative(layer.weight.grad, w.grad)}
        figures[recipe] = errors
        if max(errors.values()) > GEMM_TOLERANCE:
            failures.append(f"{recipe}: {errors}")
    reason = "; ".join(failures) + (f" (not run on this GPU: {', '.join(skipped)})" if skipped else "")
    return _result(name, report_dir, "fail" if failures else "pass", reason, tolerance=GEMM_TOLERANCE, **figures)


def check_te_training_matches_emulation(report_dir=None) -> dict:
    """Per recipe this GPU runs: 20 steps' losses through TE against the emulation's."""
    name = "te_training_matches_emulation"
    reason = _skip_reason(needs_te=True)
    if reason:
        return _result(name, report_dir, "skip", reason)
    figures, failures = {}, []
    for recipe in RECIPES:
        if _runnable(recipe):
            figures[recipe] = "not run on this GPU"
            continue
        trainer = _trainer([*ALIGNED, *_precision(recipe, "auto")], 20)
        assert trainer.fp8.backend == "te", trainer.fp8.log_line
        te_losses = [trainer.train_step(step).loss for step in range(20)]
        emulated = _trainer([*ALIGNED, *_precision(recipe, "emulation")], 20)
        em_losses = [emulated.train_step(step).loss for step in range(20)]
        diff = max(abs(a - b) / abs(b) for a, b in zip(te_losses, em_losses))
        figures[recipe] = {"max_relative_loss_diff": diff, "te_first_last": (te_losses[0], te_losses[-1]),
                           "emulation_first_last": (em_losses[0], em_losses[-1])}
        if not diff <= LOSS_TOLERANCE:
            failures.append(f"{recipe}: {diff:.3e}")
    return _result(name, report_dir, "fail" if failures else "pass", "; ".join(failures),
                   tolerance=LOSS_TOLERANCE, **figures)


def check_te_step_time_8b_width(report_dir=None) -> dict:
    """bf16 vs fp8 through TE, per recipe this GPU runs: median step time of an 8B-width 4-layer model."""
    name = "te_step_time_8b_width"
    reason = _skip_reason(needs_te=True)
    if reason:
        return _result(name, report_dir, "skip", reason)
    figures = {}
    bf16 = _timed_steps(_trainer([*WIDE, *_precision(None)], 8), 3, 5)[1]
    figures["bf16_ms_per_step"] = bf16 * 1e3
    for recipe in RECIPES:
        if _runnable(recipe):
            figures[recipe] = "not run on this GPU"
            continue
        trainer = _trainer([*WIDE, *_precision(recipe, "auto")], 8)
        seconds = _timed_steps(trainer, 3, 5)[1]
        figures[recipe] = {"ms_per_step": seconds * 1e3, "speedup_over_bf16": bf16 / seconds,
                           "path": trainer.fp8.backend}
        del trainer
        torch.cuda.empty_cache()
    return _result(name, report_dir, "pass", "timings are reported, never judged", **figures)


CHECKS: tuple[Callable[..., dict], ...] = (check_fp8_emulation_on_cuda, check_te_gemm_matches_emulation,
                                           check_te_training_matches_emulation, check_te_step_time_8b_width)
"""Every fp8 GPU check, cheapest first."""


def main() -> None:
    report_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("gpu-report")
    results = [check(report_dir) for check in CHECKS]
    for result in results:
        print(f"{result['check']:<32} {result['status']:<5} {result['reason']}")
    sys.exit(1 if any(r["status"] == "fail" for r in results) else 0)


if __name__ == "__main__":
    main()

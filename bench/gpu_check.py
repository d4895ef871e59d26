"""The GPU-only checks: what the CPU suite cannot show, run where GPUs are, into one JSON report.

    bash scripts/gpu-check.sh [REPORT.json]        # the one command: sets up, then runs this
    python -m bench.gpu_check --list                # what would run (any machine)
    python -m bench.gpu_check --out REPORT.json [--only NAME ...]
    python -m bench.gpu_check --run NAME            # one check in this process (what the runner starts)

A check is a `Check` in CHECKS: a name, the GPUs and importable packages it needs, a time budget
and a function returning a dict with "status" ("pass" or "fail") and what it measured. Each runs
in a child process of its own (a fresh CUDA context; the engine's CUDA environment set before CUDA
starts, as the runner sets it for its ranks; killed at its budget). A check the machine cannot run
(too few GPUs, a package missing, no time left) is reported "skipped" with the reason. The fp8
checks (the emulation on CUDA, Transformer Engine against it) live in bench/gpu_checks_fp8.py.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 420.0  # with the editable install before it, the script stays under 9 minutes


@dataclass(frozen=True)
class Check:
    """One GPU check: `run()` -> {"status": "pass" | "fail", ...measurements}."""

    name: str
    gpus: int
    budget_s: float
    run: Callable[[], dict]
    needs: tuple = ()  # importable packages, e.g. ("transformer_engine",)

    @property
    def about(self) -> str:
        """The first sentence of the check function's docstring."""
        text = " ".join((self.run.__doc__ or "").split())
        return text.split(". ")[0].rstrip(".") + "."


# ---------------------------------------------------------------------------------------------- checks


def cuda_device() -> dict:
    """The engine chooses CUDA: init_distributed gives this rank cuda:<local rank>."""
    import torch

    from engine.job.launch import detect_launcher, init_distributed

    device = init_distributed(detect_launcher({}))
    return {"status": "pass" if device.type == "cuda" else "fail", "device": str(device),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": str(torch.cuda.nccl.version())}


def nccl_device_check() -> dict:
    """A one-rank NCCL group: backend 'nccl', device tensors reduce, a CPU tensor is refused by the
    collectives' device check (and by NCCL itself), and leaving after a failure aborts."""
    import torch
    import torch.distributed as dist

    from engine.job.launch import free_port
    from parallel import process_group
    from parallel.collectives import CommLedger, DeviceMismatch, all_reduce, all_reduce_values, world_group

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    process_group.join(device, 0, 1, "127.0.0.1", free_port(), timeout_s=60)
    world = world_group(CommLedger(), device)
    out = {"backend": process_group.current_backend()}
    # The group has one rank, so the engine's functions return early: NCCL itself is probed with
    # torch.distributed directly (a real communicator call on a device tensor, then on a CPU one).
    value = torch.full((4,), 2.0, device=device)
    dist.all_reduce(value)
    out["device_tensor_reduced"] = value.tolist() == [2.0] * 4 and all_reduce_values([5], world) == [5]
    try:
        all_reduce(torch.ones(4), world)
        out["device_check"] = "accepted a CPU tensor"
    except DeviceMismatch as err:
        out["device_check"] = str(err)
    try:
        dist.all_reduce(torch.ones(4))
        out["nccl_on_a_cpu_tensor"] = "accepted"
    except Exception as err:  # what the check spares a run: NCCL's own refusal
        out["nccl_on_a_cpu_tensor"] = f"{type(err).__name__}: {str(err)[:200]}"
    out["leave_after_failure"] = process_group.leave(failed=True)
    ok = (out["backend"] == "nccl" and out["device_tensor_reduced"] and "live on cuda:0" in out["device_check"]
          and out["leave_after_failure"] == "abort")
    return {"status": "pass" if ok else "fail", **out}


REPLAY_MODEL = ("model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=512",
                "model.seq_length=256", "model.vocab_size=512")
"""Large enough for the fused attention kernels and split GEMMs that make CUDA nondeterministic."""


def deterministic_bf16_replay(device: str = "cuda:0", model: tuple = REPLAY_MODEL) -> dict:
    """One bf16 step computed twice (the audit) is bitwise equal on one GPU with deterministic
    kernels, and an independently built trainer repeats its losses bit for bit; the step time with
    PyTorch's default kernels is measured beside it (the cost of determinism). (`device`, `model`:
    the tests run it on the CPU with the small model, whose kernels repeat anyway.)"""
    import torch

    from bench.common import small_config
    from engine.resilience import determinism
    from engine.resilience.guard import Rewind, StepGuard
    from engine.train.synthetic_data import SyntheticData
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    cfg = small_config(["precision.dtype=bf16", *model, "resilience.audit_interval=1"], 1, steps=4)
    device = torch.device(device)
    settings = determinism.configure(cfg.resilience, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train(steps: int, guarded: bool) -> tuple[list, float]:
        trainer = Trainer(cfg, ParallelContext.single(device=device), SyntheticData.for_config(cfg))
        if guarded:
            trainer.guard = StepGuard(cfg.resilience, trainer, trainer.world)
        losses, start = [], 0.0
        for step in range(steps):
            if step == 1:
                sync()
                start = time.perf_counter()
            result = trainer.train_step(step)  # with the guard: an audit (computed twice, compared)
            if guarded:
                trainer.guard.after_step(step, result.loss, result.grad_norm, trainer.last_local_loss)
            losses.append(result.loss)
        sync()
        return losses, (time.perf_counter() - start) / (steps - 1) * 1e3

    try:
        first, _ = train(4, guarded=True)
        audit = "every step's two computations bitwise equal"
    except Rewind as err:
        first, audit = [], f"diverged: {err.reason}"
    again, ms_deterministic = train(4, guarded=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    _, ms_default = train(4, guarded=False)
    ok = bool(first) and first == again
    return {"status": "pass" if ok else "fail", "audit": audit, "losses": first, "losses_again": again,
            "settings": {k: str(v) for k, v in settings.items()}, "ms_per_step_deterministic": ms_deterministic,
            "ms_per_step_default_kernels": ms_default}


def _pretrain(run_dir: Path, dataset: str, nproc: int, settings: list) -> list:
    """Losses of a 5-step `apogee pretrain --nproc N` of the small fp32 model (CLI, NCCL ranks)."""
    from bench.common import SMALL

    cmd = [sys.executable, "-m", "cli.main", "pretrain", "--nproc", str(nproc), "--run-dir", str(run_dir), "--set",
           *SMALL, "model.seq_length=64", "model.vocab_size=512", "train.steps=5", "logging.tensorboard=false",
           "resilience.max_restarts=0", f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}",
           *settings]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(settings) or 'one GPU'}: exit {result.returncode}: {result.stderr[-1500:]}")
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def layouts_vs_one_gpu(backend: str = "nccl") -> dict:
    """dp2, pp2 and cp2 train 5 steps on two GPUs (NCCL) within the measured rounding noise of one GPU.
    (`backend`: the one the runs must report; the tests run it on CPU ranks, 'gloo'.)"""
    from data_pipeline.words_corpus import make_dataset

    work = Path(tempfile.mkdtemp(prefix="apogee-gpu-check-"))
    dataset = make_dataset(work)
    one = _pretrain(work / "one", dataset, 1, [])
    # The floor: the same run with its microbatches accumulated in another order (mbs 1 instead of 2).
    reordered = _pretrain(work / "reordered", dataset, 1, ["train.micro_batch_size=1"])
    floor = max(abs(a - b) / abs(b) for a, b in zip(reordered, one))
    tolerance = max(4 * floor, 1e-6)
    out = {"one_gpu": one, "noise_floor_rel": floor, "tolerance_rel": tolerance}
    ok = True
    for name, settings in {"dp2": ["parallel.dp=2"], "pp2": ["parallel.pp=2", "parallel.dp=1"],
                           "cp2": ["parallel.cp=2", "parallel.dp=1"]}.items():
        losses = _pretrain(work / name, dataset, 2, settings)
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, one))
        start = next(json.loads(l) for l in (work / name / "events.jsonl").read_text().splitlines()
                     if json.loads(l)["type"] == "start")
        passed = len(losses) == 5 and worst <= tolerance and start.get("backend") == backend
        ok &= passed
        out[name] = {"status": "pass" if passed else "fail", "losses": losses, "max_rel_diff": worst,
                     "backend": start.get("backend"), "device": start.get("device")}
    return {"status": "pass" if ok else "fail", **out}


def module_check(module: str, name: str) -> Callable[[], dict]:
    """`check_<name>` of bench/<module>.py (gpu_checks_fp8, gpu_checks_perf) in this runner's form
    (its "skip" is "skipped" here)."""
    import importlib

    check = getattr(importlib.import_module(f"bench.{module}"), f"check_{name}")

    def run() -> dict:
        result = check()
        return {**result, "status": "skipped" if result["status"] == "skip" else result["status"]}

    run.__doc__ = check.__doc__
    return run


def fp8_check(name: str) -> Callable[[], dict]:
    """bench/gpu_checks_fp8.py's `check_<name>`."""
    return module_check("gpu_checks_fp8", name)


def perf_check(name: str) -> Callable[[], dict]:
    """bench/gpu_checks_perf.py's `check_<name>`."""
    return module_check("gpu_checks_perf", name)


CHECKS = (
    Check("cuda_device", gpus=1, budget_s=60, run=cuda_device),
    Check("nccl_device_check", gpus=1, budget_s=90, run=nccl_device_check),
    Check("deterministic_bf16_replay", gpus=1, budget_s=150, run=deterministic_bf16_replay),
    Check("fp8_emulation_on_cuda", gpus=1, budget_s=90, run=fp8_check("fp8_emulation_on_cuda")),
    Check("te_gemm_matches_emulation", gpus=1, budget_s=60, run=fp8_check("te_gemm_matches_emulation"),
          needs=("transformer_engine",)),
    Check("te_training_matches_emulation", gpus=1, budget_s=120, run=fp8_check("te_training_matches_emulation"),
          needs=("transformer_engine",)),
    Check("te_step_time_8b_width", gpus=1, budget_s=150, run=fp8_check("te_step_time_8b_width"),
          needs=("transformer_engine",)),
    Check("cross_entropy_kernels", gpus=1, budget_s=60, run=perf_check("cross_entropy_kernels")),
    Check("ring_block_kernels", gpus=1, budget_s=60, run=perf_check("ring_block_kernels")),
    Check("wide_step_vs_model", gpus=1, budget_s=120, run=perf_check("wide_step_vs_model")),
    Check("layouts_vs_one_gpu", gpus=2, budget_s=300, run=layouts_vs_one_gpu),
)
"""Every GPU check, in the order they run: the cheap one-GPU checks first, the fp8 ones
(bench/gpu_checks_fp8.py) and the fit-and-speed ones (bench/gpu_checks_perf.py) next, the two-GPU
layouts last."""


# ---------------------------------------------------------------------------------------------- runner


def skip_reason(check: Check, gpus: int, left_s: float) -> str | None:
    """Why `check` cannot run here (None: it can)."""
    if gpus < check.gpus:
        return f"needs {check.gpus} GPU(s), found {gpus}"
    missing = [p for p in check.needs if importlib.util.find_spec(p) is None]
    if missing:
        return f"needs {', '.join(missing)} (not importable)"
    if left_s < check.budget_s:
        return f"needs up to {check.budget_s:.0f} s, {left_s:.0f} s of the script's budget left"
    return None


def child_environment() -> dict:
    """The environment a check runs in: the project importable and the engine's CUDA settings
    (deterministic kernels, as the runner gives its ranks) set before CUDA starts."""
    from engine.config import ResilienceConfig
    from engine.resilience import determinism

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(determinism.environment(ResilienceConfig(), cuda=True, environ=env))
    return env


def run_one(check: Check) -> dict:
    """Run `check` in a child process within its budget; its result dict, or a failure saying why."""
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--run", check.name], cwd=ROOT,
                                env=child_environment(), capture_output=True, text=True, timeout=check.budget_s)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        outcome = json.loads(lines[-1]) if result.returncode == 0 and lines else {
            "status": "fail", "error": f"exit {result.returncode}: {result.stderr[-2000:]}"}
    except subprocess.TimeoutExpired:
        outcome = {"status": "fail", "error": f"no result within its budget of {check.budget_s:.0f} s"}
    return {"name": check.name, "seconds": round(time.perf_counter() - start, 1), **outcome}


def gpu_count() -> int:
    """GPUs this machine's PyTorch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_checks(checks, gpus: int, budget_s: float = TOTAL_BUDGET_S) -> list[dict]:
    """Each check run or skipped, in order, within the total budget."""
    deadline = time.monotonic() + budget_s
    results = []
    for check in checks:
        reason = skip_reason(check, gpus, deadline - time.monotonic())
        results.append({"name": check.name, "status": "skipped", "reason": reason} if reason else run_one(check))
        print(f"gpu-check: {check.name}: {results[-1]['status']}"
              + (f" ({results[-1].get('reason') or results[-1].get('error', '')})"[:300]
                 if results[-1]["status"] != "pass" else ""), flush=True)
    return results


def report(results: list[dict], gpus: int) -> dict:
    """The JSON report: the machine, the commit, every check's result and the counts."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skipped")}
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "commit": commit, "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
            "checks": results, "summary": counts}


def main(argv=None) -> int:
    """Command line: --list, --run NAME, or run every check into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the checks and what each needs")
    parser.add_argument("--run", metavar="NAME", help="run one check in this process, print its JSON")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    parser.add_argument("--out", type=Path, help="report path (default bench/results/gpu-check-<date>.json)")
    args = parser.parse_args(argv)
    names = {c.name: c for c in CHECKS}
    for name in (args.only or []) + ([args.run] if args.run else []):
        if name not in names:
            parser.error(f"unknown check {name!r}; checks: {', '.join(names)}")
    if args.list:
        for c in CHECKS:
            print(f"  {c.name:30s} {c.gpus} GPU(s){', needs ' + ', '.join(c.needs) if c.needs else ''}: {c.about}")
        return 0
    if args.run:
        print(json.dumps(names[args.run].run()))
        return 0
    gpus = gpu_count()
    results = run_checks([names[n] for n in args.only] if args.only else CHECKS, gpus)
    out = args.out or ROOT / "bench" / "results" / f"gpu-check-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report(results, gpus), indent=2) + "\n")
    print(f"gpu-check: report in {out}", flush=True)
    return 1 if any(r["status"] == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/gpu-check.sh and bench/gpu_check.py on a machine without a GPU: the script says so, shows
what it would run and exits 0; the runner skips what a machine cannot run, saying why."""
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the checks for real")
def test_the_script_on_a_cpu_machine_says_no_gpu_lists_the_checks_and_exits_0(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(["bash", "scripts/gpu-check.sh", str(report)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no GPU on this machine" in result.stdout and "nothing run" in result.stdout
    for check in gpu_check.CHECKS:
        assert check.name in result.stdout
    assert not report.exists()  # and nothing installed or written


def test_a_check_this_machine_cannot_run_is_skipped_with_the_reason():
    needs_te = gpu_check.Check("fp8_example", gpus=1, budget_s=10, run=lambda: {}, needs=("no_such_package_x",))
    assert gpu_check.skip_reason(needs_te, gpus=0, left_s=100) == "needs 1 GPU(s), found 0"
    assert gpu_check.skip_reason(needs_te, gpus=8, left_s=100) == "needs no_such_package_x (not importable)"
    two = gpu_check.CHECKS[-1]
    assert gpu_check.skip_reason(two, gpus=1, left_s=1000) == "needs 2 GPU(s), found 1"
    assert "budget left" in gpu_check.skip_reason(two, gpus=2, left_s=10)
    results = gpu_check.run_checks(gpu_check.CHECKS, gpus=0)
    assert [r["status"] for r in results] == ["skipped"] * len(gpu_check.CHECKS)
    counts = gpu_check.report(results, 0)["summary"]
    assert counts == {"pass": 0, "fail": 0, "skipped": len(gpu_check.CHECKS)}


def test_the_fp8_checks_are_in_the_runner_and_skip_here_in_its_form():
    checks = {c.name: c for c in gpu_check.CHECKS}
    te = ["te_gemm_matches_emulation", "te_training_matches_emulation", "te_step_time_8b_width"]
    assert all(checks[name].needs == ("transformer_engine",) for name in te)
    assert "emulated fp8 linear" in checks["fp8_emulation_on_cuda"].about
    if not torch.cuda.is_available():
        result = checks["fp8_emulation_on_cuda"].run()  # what `--run NAME` prints in the child
        assert (result["status"], result["reason"]) == ("skipped", "no CUDA device")


def test_the_fit_and_speed_checks_are_in_the_runner_and_skip_here_in_its_form():
    checks = {c.name: c for c in gpu_check.CHECKS}
    names = ["cross_entropy_kernels", "ring_block_kernels", "wide_step_vs_model"]
    assert "performance model's estimates" in checks["wide_step_vs_model"].about
    if not torch.cuda.is_available():
        for name in names:
            result = checks[name].run()
            assert (result["status"], result["reason"]) == ("skipped", "no CUDA device"), name


def test_every_check_says_what_it_shows_and_names_are_unique():
    names = [c.name for c in gpu_check.CHECKS]
    assert len(names) == len(set(names)) and all(c.about.strip(".") for c in gpu_check.CHECKS)
    with pytest.raises(SystemExit):
        gpu_check.main(["--run", "no_such_check"])


def test_the_replay_check_runs_end_to_end_on_the_cpu_and_passes_there():
    result = gpu_check.deterministic_bf16_replay(device="cpu", model=())  # the small model
    assert result["status"] == "pass", result
    assert result["audit"] == "every step's two computations bitwise equal"
    assert len(result["losses"]) == 4 and result["losses"] == result["losses_again"]
    assert result["settings"] == {}  # CPU: nothing to switch


@pytest.mark.slow
@pytest.mark.distributed
def test_the_layouts_check_runs_end_to_end_on_cpu_ranks_and_passes_there():
    result = gpu_check.layouts_vs_one_gpu(backend="gloo")
    print("noise floor", result["noise_floor_rel"], "tolerance", result["tolerance_rel"])
    assert result["status"] == "pass", result
    for name in ("dp2", "pp2", "cp2"):
        assert result[name]["backend"] == "gloo" and len(result[name]["losses"]) == 5
        assert result[name]["max_rel_diff"] <= result["tolerance_rel"]

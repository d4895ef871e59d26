"""The benchmarks still run (smoke versions): they print their ratios and figures, never assert timings."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, f"bench/{script}", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_training_bench_prints_the_ratio_and_mfu():
    out = _run("bench_train.py", "--quick")
    assert "ratio" in out.lower() and "mfu" in out.lower()


def test_checks_overhead_bench_prints_percentages():
    out = _run("bench_resilience.py", "--quick")
    assert "guard, defaults" in out and "%" in out


def test_checkpoint_bench_prints_pause_and_size():
    out = _run("bench_checkpoint.py", "--quick")
    assert "pause ms" in out and "size MB" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 7]
    assert [int(row[0]) for row in rows] == [1, 2, 4]  # verification per rank at 1, 2 and 4 ranks, side by side
    assert [float(row[1]) for row in rows] == [32.0, 16.0, 8.0]  # each rank verifies about its own bytes


def test_data_bench_prints_every_corpus_format_side_by_side():
    out = _run("bench_data.py", "--quick", "--workers", "1")
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"jsonl", "jsonl.gz", "jsonl.zst", "parquet", "save_to_disk"} <= rows
    assert "MB/s" in out and "docs/s" in out and "byte-identical: checked" in out


def test_fp8_bench_prints_every_recipe_against_bf16_with_the_seed_spread():
    out = _run("bench_fp8.py", "--quick")
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"bf16", "delayed", "tensorwise", "blockwise", "mxfp8"} <= rows
    assert "vs bf16" in out and "seed spread" in out


def test_init_bench_prints_each_rank_and_the_ratio_last():
    out = _run("bench_init.py", "--quick")
    rows = [line.split() for line in out.splitlines() if line.startswith("tp")]
    assert [(row[0], row[1]) for row in rows] == [("tp1", "0"), ("tp2", "0"), ("tp2", "1")]
    # each tp=2 rank holds half the tp=1 shard
    assert float(rows[1][3]) == pytest.approx(float(rows[0][3]) / 2, abs=0.01)
    assert out.strip().splitlines()[-1].startswith("init peak host memory: tp2/tp1 = ")

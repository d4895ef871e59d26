"""`apogee bench`: a short run of a config, summarised (median step time, tokens/s, MFU, memory)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.perf.bench import summarise

ROOT = Path(__file__).resolve().parents[1]


def test_summary_is_the_median_of_the_measured_steps():
    records = [{"step": s, "iteration_time": t, "tokens_per_s": 100 / t, "mfu": 0.1 / t, "throughput": 1 / t,
                "mem_params_bytes": 10, "mem_grads_bytes": 20, "mem_optim_bytes": 40}
               for s, t in ((1, 9.0), (2, 1.0), (3, 2.0), (4, 3.0))]
    summary = summarise(records, warmup=1)  # step 1 (9 s, a warm-up) is left out
    assert summary["steps"] == 3 and summary["step_time_s"] == 2.0
    assert summary["tokens_per_s"] == 50.0 and summary["mfu"] == pytest.approx(0.05)
    assert (summary["mem_params_bytes"], summary["mem_grads_bytes"], summary["mem_optim_bytes"]) == (10, 20, 40)
    with pytest.raises(ValueError, match="no step after the 4 warm-up steps"):
        summarise(records, warmup=4)


def test_apogee_bench_runs_a_config_and_prints_its_summary(tmp_path, ):
    from data_pipeline.words_corpus import make_dataset

    dataset = make_dataset(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cli.main", "bench", "--steps", "3", "--warmup", "1", "--json",
                           "--run-dir", str(tmp_path / "bench"), "--set", "model.hidden_size=64",
                           "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
                           f"data.inputs=[{dataset}]", f"data.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
    records = (tmp_path / "bench" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 4  # the warm-up step is run and logged, then left out of the summary
    again = subprocess.run([sys.executable, "-m", "cli.main", "bench", "--run-dir", str(tmp_path / "bench")],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already holds a run" in again.stderr

"""The README's walkthrough end to end in its short version (bench/walkthrough.py --quick): pretrain,
the WSD cooldown branch, SFT, DPO and GRPO on the arithmetic task, then `apogee eval` of the five
checkpoints side by side, each stage validating as it trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("base", "midtrain", "sft", "dpo", "grpo")
VALIDATION_KEYS = {"base": "val_loss", "midtrain": "val_loss", "sft": "val_loss", "dpo": "val_reward_accuracy",
                   "grpo": "val_accuracy"}


def test_the_walkthrough_runs_end_to_end_in_its_short_version(tmp_path):
    result = subprocess.run([sys.executable, "bench/walkthrough.py", "--quick", "--json", "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=1500,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    table = next(line for line in result.stdout.splitlines() if line.startswith("[{"))
    rows = json.loads(table)
    assert [Path(row["checkpoint"]).parts[-3] for row in rows] == list(RUNS)
    for row in rows:
        assert {"loss", "ppl", "bits_per_byte", "accuracy", "pass@1"} <= set(row) and row["tasks"] == 80
    assert rows[1]["step"] == rows[0]["step"]  # the cooldown branch ends where the main run does
    for run, key in VALIDATION_KEYS.items():
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert any(key in record for record in records), run
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "walkthrough: GRPO accuracy" in result.stdout

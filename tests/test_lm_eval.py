"""lm-evaluation-harness: a checkpoint exported to HF (weights and the byte tokenizer, `apogee export`)
runs under `lm_eval --model hf` on a multiple-choice task defined locally in YAML (no download), and
its accuracy is the one computed by hand from our own model's log-likelihoods of the choices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("1+1=", ["2", "3", "7"], 0), ("2+2=", ["5", "4", "1"], 1), ("The cat", [" sat", " zq", " qx"], 0),
             ("def f(", ["x):", "@@@", "]]]"], 0), ("import ", ["os", "#(", "))"], 0), ("3+4=", ["9", "0", "7"], 2)]
TASK_YAML = """task: apogee_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _our_accuracy(model) -> float:
    """The task's accuracy from our model: the choice with the largest summed log-probability."""
    correct = 0
    for context, choices, label in QUESTIONS:
        scores = []
        for choice in choices:
            ids = list((context + choice).encode())
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
            start = len(context.encode())
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return correct / len(QUESTIONS)


def test_an_exported_checkpoint_runs_under_lm_eval_hf_on_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    from data_pipeline.tokenizer_files import write_tokenizer_files
    from engine.model.hf_interop import save_hf
    from tests.test_generate import tiny_model

    model = tiny_model(seed=3)
    save_hf(model, model.cfg, tmp_path / "hf")
    write_tokenizer_files("byte", tmp_path / "hf")
    data = tmp_path / "tasks" / "mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in QUESTIONS))
    (tmp_path / "tasks" / "apogee_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'hf'},dtype=float32,add_bos_token=False", "--tasks", "apogee_tiny_mc",
         "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results*.json")]
    assert results, result.stdout[-2000:]
    accuracy = results[0]["results"]["apogee_tiny_mc"]["acc,none"]
    print(f"lm_eval acc {accuracy}, by hand {_our_accuracy(model)}")
    assert accuracy == pytest.approx(_our_accuracy(model))

"""The Stage seam: every stage runs from a pre-training checkpoint in the README's words, a stage
outside the package (docs/examples/ipo_stage.py) runs the same way, and one stage's settings are
refused in another's run while an old config.yaml with default sections still loads."""
import json
import math
from pathlib import Path

import pytest
import yaml

from cli.main import main
from data_pipeline.words_corpus import make_dataset
from stages.registry import builtin_stages

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.seq_length=16", "train.micro_batch_size=2",
         "train.global_batch_size=4", "logging.tensorboard=false", "optim.warmup_steps=1", "resilience.check_interval=0"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pre-training run of 4 steps with checkpoints (the start of every later stage)."""
    tmp = tmp_path_factory.mktemp("rocket")
    data = [f"data.inputs=[{make_dataset(tmp)}]", f"data.cache_dir={tmp / 'cache'}"]
    run = tmp / "pretrain"
    assert main(["pretrain", "--run-dir", str(run), "--set", *SMALL, *data, "train.steps=4",
                 "checkpoint.interval=2"]) == 0
    return tmp, run, data


def test_every_stage_runs_three_steps_from_a_pretrain_checkpoint(pretrained):
    """The README's commands, in small: midtrain branches from the run's checkpoints/ folder, SFT starts
    from its weights, DPO and GRPO from the SFT run."""
    tmp, run, data = pretrained
    checkpoints = f"{run}/checkpoints"
    mid = tmp / "midtrain"
    assert main(["midtrain", "--run-dir", str(mid), "--set", *SMALL, *data, "train.steps=7", "optim.schedule=wsd",
                 f"midtrain.branch_from={checkpoints}"]) == 0
    assert [r["step"] for r in _metrics(mid)] == [5, 6, 7]  # continues from the newest checkpoint (step 4)
    examples = _jsonl(tmp / "sft.jsonl", [{"prompt": f"{i % 7}+{i % 5}=", "response": str(i % 7 + i % 5)}
                                         for i in range(16)])
    sft = tmp / "sft"
    assert main(["sft", "--run-dir", str(sft), "--set", *SMALL, "train.steps=3", f"sft.inputs=[{examples}]",
                 f"train.init_from={checkpoints}"]) == 0
    pairs = _jsonl(tmp / "pairs.jsonl", [{"prompt": f"{i % 7}+{i % 5}=", "chosen": str(i % 7 + i % 5),
                                          "rejected": str(i % 7 + i % 5 + 1)} for i in range(16)])
    dpo = tmp / "dpo"
    assert main(["dpo", "--run-dir", str(dpo), "--set", *SMALL, "train.steps=3", f"dpo.inputs=[{pairs}]",
                 f"train.init_from={sft}/checkpoints"]) == 0
    prompts = _jsonl(tmp / "prompts.jsonl", [{"prompt": f"say {i}:", "answer": str(i)} for i in range(8)])
    grpo = tmp / "grpo"
    assert main(["grpo", "--run-dir", str(grpo), "--set", *SMALL, "train.steps=3", "grpo.group_size=2",
                 "grpo.max_new_tokens=2", f"grpo.inputs=[{prompts}]", f"train.init_from={sft}"]) == 0
    for stage_run in (sft, dpo, grpo):
        assert [r["step"] for r in _metrics(stage_run)] == [1, 2, 3]
    assert _metrics(dpo)[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the start
    saved = yaml.safe_load((dpo / "config.yaml").read_text())
    assert "dpo" in saved and not {"sft", "grpo", "midtrain"} & set(saved)  # only the running stage's section


def test_an_external_stage_runs_like_a_built_in_one(pretrained, tmp_path, monkeypatch):
    """docs/examples/ipo_stage.py, named by module:Class: its section loads and IPO's loss is its own."""
    monkeypatch.chdir(ROOT)  # the module is found from the working directory, as for `python -m`
    _, run, _ = pretrained
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{i}=", "chosen": "a", "rejected": "b"} for i in range(8)])
    out = tmp_path / "ipo"
    assert main(["run", "docs.examples.ipo_stage:IPOStage", "--run-dir", str(out), "--set", *SMALL,
                 "train.steps=2", "ipo.beta=0.25", f"ipo.inputs=[{pairs}]", f"train.init_from={run}"]) == 0
    records = _metrics(out)
    # policy == reference at the start, so h = 0 and IPO's loss is (0 - 1 / (2 tau))^2 = 4 at tau 0.25
    assert records[0]["loss"] == pytest.approx(4.0, rel=1e-6) and records[-1]["loss"] < records[0]["loss"]
    assert yaml.safe_load((out / "config.yaml").read_text())["ipo"]["beta"] == 0.25


def test_a_bad_external_stage_is_a_clear_error(capsys):
    assert main(["run", "docs.examples.nowhere:IPOStage"]) == 2
    assert "stage 'docs.examples.nowhere:IPOStage': cannot import 'IPOStage'" in capsys.readouterr().err
    assert main(["run", "engine.config:ApogeeConfig"]) == 2
    assert "is not an engine.stage.Stage" in capsys.readouterr().err


def test_an_old_config_with_every_stage_section_still_loads_for_any_stage(tmp_path):
    """config.yaml of an earlier run held sft, midtrain, dpo and grpo sections at their defaults."""
    old = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()) or {}
    old.update(sft={"inputs": [], "prompt_key": "prompt", "response_key": "response", "lora_rank": 0,
                    "lora_alpha": 16.0},
               midtrain={"branch_from": None}, dpo={"inputs": [], "beta": 0.1},
               grpo={"inputs": [], "group_size": 8, "max_new_tokens": 32, "temperature": 1.0, "reward": "exact_match",
                     "clip": 0.2, "kl_coeff": 0.04, "scale_rewards": True})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    registry = builtin_stages()
    for name in registry.names():
        stage = registry.get(name)
        cfg = registry.load_config(stage, path)
        registry.check_foreign(stage, cfg)  # default-valued sections of other stages: accepted
        assert set(cfg.sections) == set(stage.sections)


def test_a_stage_name_or_section_cannot_be_taken_twice():
    from engine.stage import Stage

    registry = builtin_stages()

    class Clash(Stage):
        name = "clash"
        sections = {"dpo": dict}

    with pytest.raises(ValueError, match="config section 'dpo' belongs to stage 'dpo'"):
        registry.register(Clash())
    with pytest.raises(ValueError, match="stage 'sft' is registered already"):
        registry.register(type(registry.get("sft"))())

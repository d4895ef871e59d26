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


def test_post_training_stages_load_their_presets_and_pretraining_keeps_tiny(tmp_path):
    """Without --config each stage loads its preset (engine/stage.py: default_config); its values are
    defaults (not in cfg.explicit), and a --config file replaces the preset."""
    registry = builtin_stages()
    expected = {"pretrain": ("tiny", 3e-3, "cosine", None), "midtrain": ("tiny", 3e-3, "cosine", None),
                "sft": ("sft", 2e-5, "cosine", 3.0), "dpo": ("dpo", 1e-6, "cosine", 3.0),
                "grpo": ("grpo", 1e-6, "constant", 1.0)}
    for name, (run_name, lr, schedule, epochs) in expected.items():
        cfg = registry.load_config(registry.get(name))
        assert (cfg.name, cfg.optim.lr, cfg.optim.schedule, cfg.train.epochs) == (run_name, lr, schedule, epochs), name
        assert cfg.explicit == frozenset()
    own = tmp_path / "own.yaml"
    own.write_text("train: {steps: 7}\n")
    cfg = registry.load_config(registry.get("sft"), own, ["optim.warmup_steps=1"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.steps) == (3e-3, None, 7)  # the engine's defaults under the file
    assert cfg.explicit == {"train.steps", "optim.warmup_steps"}


def test_every_value_of_a_preset_is_documented_where_it_is_set():
    for name in ("sft", "dpo", "grpo"):
        preset = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        lines = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()
        for section, values in preset.items():
            for key in (values if isinstance(values, dict) else {section: values}):
                line = next(line for line in lines if line.strip().startswith(f"{key}:"))
                assert "#" in line, f"configs/{name}.yaml: {key} has no comment"


def test_epochs_set_the_length_of_a_run_unless_steps_are_set(tmp_path, capsys):
    from engine.config import ConfigError

    registry = builtin_stages()
    sft = registry.get("sft")
    examples = _jsonl(tmp_path / "x.jsonl", [{"prompt": str(i), "response": "y"} for i in range(10)])
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{examples}]", "train.global_batch_size=4"])
    sft.prepare(cfg, None, "auto")
    assert cfg.train.steps == 8  # ceil(3 epochs * 10 examples / 4 per step)
    assert "train.epochs=3 over 10 examples at train.global_batch_size=4: train.steps=8" in capsys.readouterr().err
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{examples}]", "train.steps=5"])
    sft.prepare(cfg, None, "auto")
    assert (cfg.train.steps, cfg.train.epochs) == (5, None)  # steps the user set win over the preset's epochs
    cfg = registry.load_config(sft, None, [f"sft.inputs=[{examples}]", "train.epochs=0.5", "train.global_batch_size=2"])
    sft.prepare(cfg, None, "auto")
    assert cfg.train.steps == 3
    pretrain = registry.get("pretrain")
    with pytest.raises(ConfigError, match=r"train.epochs=2.0: `apogee pretrain` trains on the pre-training blend"):
        pretrain.prepare(registry.load_config(pretrain, None, ["train.epochs=2"]), None, "auto")

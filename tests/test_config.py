"""Config: YAML + --set overrides, and validation errors that name the key, value and valid set."""
import pytest

from engine.config import ConfigError, config_from_dict, load_config, save_config
from engine.config_validation import validate


def test_overrides_parse_values_as_yaml_and_nest_by_dots(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                            "optim.lr=1e-3", "data.inputs=[a, b]", "model.rope_scaling={factor: 8.0}"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.data.inputs == ["a", "b"]
    assert cfg.model.rope_scaling == {"factor": 8.0}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("configs/llama3-405b.yaml", ["train.steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("model.hidden_sise=64", "unknown config key 'model.hidden_sise'; valid keys here: hidden_size"),
    ("parallel.tp=two", "parallel.tp='two': expected an integer"),
    ("train=3", "train=3: expected a mapping of steps"),
    ("optim.lr", "expected KEY=VALUE"),
])
def test_bad_override_names_the_key_and_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, r"parallel.tp=3: must divide model.num_heads=4"),
    (["parallel.tp=2", "parallel.dp=3"], 4, r"parallel.dp=3: tp\*cp\*dp\*pp = 2\*1\*3\*1 = 6 must equal the world size 4"),
    (["parallel.pp=3"], 3, r"parallel.pp=3: pp\*virtual_stages=3 model chunks need at least that many layers"),
    (["train.global_batch_size=10"], 2, r"train.global_batch_size=10: must be a multiple of micro_batch_size\*dp = 4\*2 = 8"),
    (["optim.schedule=linear"], 1, r"optim.schedule='linear': expected one of cosine, wsd, constant"),
    (["precision.dtype=fp16"], 1, r"precision.dtype='fp16': expected one of fp32, bf16, fp8"),
    (["model.num_kv_heads=3"], 1, r"model.num_kv_heads=3: must divide model.num_heads=4"),
    (["parallel.cp=3"], 3, r"parallel.cp=3: needs model.seq_length=128 divisible by 2\*cp=6"),
    (["parallel.zero=4"], 1, r"parallel.zero=4: expected one of 0, 1, 2, 3"),
    (["parallel.pp=2", "parallel.zero=1", "model.tie_embeddings=true"], 4,
     r"parallel.zero=1: tied embeddings across pipeline stages .* work with zero=0 only"),
    (["model.num_experts=4", "parallel.ep=2", "parallel.zero=1"], 2,
     r"parallel.zero=1: expert parallelism \(parallel.ep > 1\) works with zero=0 only"),
    (["model.num_experts=4", "parallel.tp=2"], 2, r"parallel.tp=2: MoE models .* need tp=1 for now"),
    (["model.num_experts=4", "parallel.ep=3"], 3, r"parallel.ep=3: must divide model.num_experts=4"),
    (["parallel.ep=2"], 2, r"parallel.ep=2: expert parallelism needs model.num_experts > 0"),
    (["precision.dtype=fp8", "train.compile=true"], 1, r"train.compile=True: precision.dtype=fp8 runs eagerly"),
    (["lora.rank=4", "parallel.zero=1"], 2, r"parallel.zero=1: LoRA trains a few adapters"),
    (["lora.rank=-1"], 1, r"lora.rank=-1: must be >= 0"),
    (["lora.rank=4", "lora.targets=[q_proj, wq]"], 1, r"lora.targets=\['q_proj', 'wq'\]: a non-empty list of q_proj"),
])
def test_invalid_layout_is_refused_before_launch(overrides, world, message):
    cfg = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_dp_is_derived_from_the_world_size():
    cfg = validate(load_config("configs/tiny.yaml", ["parallel.tp=2"]), 8)
    assert cfg.parallel.dp == 4


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="--config nope.yaml: no such file"):
        load_config("nope.yaml")


def test_min_lr_is_checked_only_where_a_schedule_decays_to_it():
    """A constant schedule never reads optim.min_lr: --set optim.lr=1e-4 alone is fine there."""
    validate(load_config(None, ["optim.schedule=constant", "optim.lr=1e-4"]), 1)
    for schedule in ("cosine", "wsd"):
        with pytest.raises(ConfigError, match=rf"optim.min_lr=0.0003: must be in \[0, optim.lr=0.0001\] "
                                              rf"\(optim.schedule={schedule} decays to it\)"):
            validate(load_config(None, [f"optim.schedule={schedule}", "optim.lr=1e-4"]), 1)

"""HF Llama interop: logits equal transformers' LlamaForCausalLM in fp32 both ways, config.json read
back by AutoConfig to the model's true values (transformers 4 and 5 key styles), and the round trip
through `train.init_from` (the architecture from config.json, contradictions refused) exact."""
import dataclasses
import json

import pytest
import torch

from engine.config import ConfigError, ModelConfig
from engine.model.decoder import LlamaModel, init_parameters
from engine.model.hf_config import hf_config, model_config_from_hf
from engine.model.hf_interop import from_hf_state_dict, load_hf, save_hf, to_hf_state_dict

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                  vocab_size=96, seq_length=48, rope_base=500000.0, norm_eps=1e-5,
                  rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position=64))
LLAMA3 = dataclasses.replace(CFG, norm_eps=1e-6, hidden_size=128, num_heads=8, num_kv_heads=2, ffn_hidden_size=160,
                             vocab_size=128, seq_length=32)
"""Llama-3-shaped: eps 1e-6, theta 500000, llama3 RoPE scaling, GQA (8 heads / 2 kv), untied."""
LOGIT_TOLERANCE = 1e-5
"""fp32 logits of two implementations of the same math (sdpa vs our kernel): measured <= ~1e-6, printed."""


def _tokens(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


def _model(cfg, seed=11):
    model = LlamaModel(cfg)
    init_parameters(model, seed=seed)
    with torch.no_grad():  # wider weights than the default init, so attention and RoPE matter to the logits
        for p in model.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    return model


def _load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                                    output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _logit_diff(ours, theirs, cfg, seed=0):
    x = _tokens(cfg, seed)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    return diff


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scaled_rope", [False, True])
def test_saved_model_matches_transformers_logits(tmp_path, tie, scaled_rope):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, rope_scaling=CFG.rope_scaling if scaled_rope else None)
    ours = _model(cfg)
    save_hf(ours, cfg, tmp_path)
    assert _logit_diff(ours, _load_transformers(tmp_path), cfg) < LOGIT_TOLERANCE


@pytest.mark.parametrize("tie", [False, True])
def test_random_transformers_model_loads_with_equal_logits(tmp_path, tie):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in hf_config(dataclasses.replace(CFG, tie_embeddings=tie)).items()
              if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    kwargs["initializer_range"] = 0.1
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    theirs.save_pretrained(tmp_path)
    cfg, state = load_hf(tmp_path)
    assert cfg == dataclasses.replace(CFG, tie_embeddings=tie, init_std=0.1, max_position_embeddings=CFG.seq_length)
    ours = LlamaModel(cfg)
    ours.load_state_dict(state)
    assert _logit_diff(ours, theirs, cfg, seed=1) < LOGIT_TOLERANCE


def test_state_dict_names_round_trip():
    ours = LlamaModel(CFG)
    hf = to_hf_state_dict(ours.state_dict(), CFG)
    assert "model.layers.2.self_attn.k_proj.weight" in hf and "lm_head.weight" in hf
    assert "model.norm.weight" in hf and "model.embed_tokens.weight" in hf
    assert from_hf_state_dict(hf, CFG).keys() == ours.state_dict().keys()


@pytest.mark.parametrize("style", [4, 5])
def test_config_json_reads_back_through_autoconfig_in_both_key_styles(tmp_path, style):
    """transformers 5 writes rope_parameters, 4 rope_theta + rope_scaling: both read back to the model's values."""
    written = hf_config(LLAMA3, style=style)
    assert ("rope_parameters" in written) == (style >= 5) and ("rope_theta" in written) == (style < 5)
    (tmp_path / "config.json").write_text(json.dumps(written))
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    rope = getattr(auto, "rope_parameters", None) or dict(auto.rope_scaling, rope_theta=auto.rope_theta)
    assert (auto.model_type, auto.rms_norm_eps, rope["rope_theta"], rope["rope_type"]) == ("llama", 1e-6, 500000.0, "llama3")
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) \
        == (8.0, 1.0, 4.0, 64)
    assert (auto.num_attention_heads, auto.num_key_value_heads, auto.head_dim, auto.intermediate_size) == (8, 2, 16, 160)
    assert auto.tie_word_embeddings is False and auto.max_position_embeddings == LLAMA3.seq_length
    assert model_config_from_hf(auto.to_dict()) == dataclasses.replace(LLAMA3, max_position_embeddings=LLAMA3.seq_length)


def test_export_is_sharded_with_an_index_in_the_chosen_dtype(tmp_path):
    from safetensors import safe_open

    files = save_hf(_model(LLAMA3), LLAMA3, tmp_path, dtype=torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    dtypes = set()
    for file in files:
        with safe_open(str(tmp_path / file), "pt") as handle:
            dtypes |= {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes == {torch.bfloat16}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in LlamaModel(LLAMA3).parameters())


def _init_from_config(hf_dir, overrides=()):
    from stages.registry import builtin_stages

    registry = builtin_stages()
    stage = registry.get("sft")
    return registry.load_config(stage, None, [f"train.init_from={hf_dir}", "sft.inputs=[x.jsonl]",
                                              "train.micro_batch_size=2", "train.global_batch_size=2", *overrides])


@pytest.mark.parametrize("cfg", [LLAMA3, dataclasses.replace(LLAMA3, tie_embeddings=True, rope_scaling=None)],
                         ids=["llama3_untied", "tied"])
def test_round_trip_through_init_from_is_exact(tmp_path, cfg, capsys):
    """Export, then `train.init_from`: the run takes eps, theta, RoPE scaling, GQA and tying from
    config.json (no model key set), and its weights and logits equal the exported model's exactly."""
    from engine.config_validation import validate
    from engine.model.parallelize import gather_full_state_dict
    from engine.state.init_from import initialize_from
    from engine.train.synthetic_data import SyntheticData
    from engine.train.trainer import Trainer
    from parallel.topology import ParallelContext

    ours = _model(cfg)
    save_hf(ours, cfg, tmp_path, max_shard_bytes=60_000)
    assert _logit_diff(ours, _load_transformers(tmp_path), cfg) < LOGIT_TOLERANCE
    run = validate(_init_from_config(tmp_path, [f"model.seq_length={cfg.seq_length}"]), 1)
    assert "the model is" in capsys.readouterr().out
    assert dataclasses.replace(run.model, max_position_embeddings=None, init_std=cfg.init_std) == cfg
    trainer = Trainer(run, ParallelContext.single(), SyntheticData.for_config(run, masked=True))
    assert initialize_from(trainer, str(tmp_path)) == "hf weights"
    loaded = gather_full_state_dict(trainer.chunks, ParallelContext.single())
    assert loaded.keys() == ours.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in ours.state_dict().items())
    x = _tokens(cfg, seed=3)
    with torch.no_grad():
        assert torch.equal(trainer.model(x), ours(x))


def test_contradicting_model_keys_are_refused_and_allowed_changes_printed(tmp_path, capsys):
    save_hf(_model(LLAMA3), LLAMA3, tmp_path)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads=4 here, 2 in the checkpoint; "
                                          r"model.norm_eps=1e-05 here, 1e-06 in the checkpoint"):
        _init_from_config(tmp_path, ["model.norm_eps=1e-5", "model.num_kv_heads=4"])
    cfg = _init_from_config(tmp_path, ["model.rope_scaling=null", "model.rope_base=1000000.0", "model.seq_length=256"])
    err = capsys.readouterr().err
    assert "model.rope_scaling=None here" in err and "allowed: long-context extension" in err
    assert "model.rope_base=1000000.0 here, 500000.0" in err
    assert (cfg.model.rope_scaling, cfg.model.rope_base, cfg.model.norm_eps) == (None, 1e6, 1e-6)
    assert cfg.model.max_position_embeddings == LLAMA3.seq_length and cfg.model.seq_length == 256


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_theta": 1e4}, "rope_type='yarn'"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config="),
])
def test_unsupported_config_fields_are_refused_by_name(tmp_path, change, field):
    config = dict(hf_config(CFG, style=4), **change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config.json {field}".replace("(", r"\(").replace("[", r"\[")):
        _init_from_config(tmp_path)


def test_qk_norm_is_refused_by_name():
    cfg = dataclasses.replace(CFG, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf_state_dict(LlamaModel(cfg).state_dict(), cfg)
    with pytest.raises(ValueError, match="qk_norm"):
        hf_config(cfg)


def test_fine_tuning_a_hf_model_and_exporting_it_keeps_its_config_and_tokenizer(tmp_path, capsys):
    """`apogee sft --set train.init_from=HF_DIR` (no model key, no tokenizer set) takes both from the
    directory; `apogee export --dtype bf16` writes a complete directory with the same true values."""
    from cli.main import main
    from data_pipeline.tokenizer import get_tokenizer
    from tests.hf_fixtures import CONVERSATIONS, write_llama3_tokenizer

    cfg = dataclasses.replace(LLAMA3, vocab_size=320)
    source = tmp_path / "llama3"
    save_hf(_model(cfg), cfg, source)
    write_llama3_tokenizer(source)
    examples = tmp_path / "chat.jsonl"
    examples.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    run, out = tmp_path / "sft", tmp_path / "export"
    assert main(["sft", "--run-dir", str(run), "--set", f"train.init_from={source}", f"sft.inputs=[{examples}]",
                 "model.seq_length=96", "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=2",
                 "checkpoint.interval=2", "logging.tensorboard=false"]) == 0
    assert f"tokenizer {source}" in capsys.readouterr().out
    assert main(["export", "--checkpoint", f"{run}/checkpoints", "--out", str(out), "--dtype", "bf16",
                 "--max-shard-size", "100KB"]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    auto = transformers.AutoConfig.from_pretrained(out)
    rope = getattr(auto, "rope_parameters", None) or dict(auto.rope_scaling, rope_theta=auto.rope_theta)
    assert (auto.rms_norm_eps, rope["rope_theta"], rope["rope_type"], auto.num_key_value_heads) == (1e-6, 5e5, "llama3", 2)
    assert auto.max_position_embeddings == 96  # the longest context the model has now been trained at
    ours, theirs = get_tokenizer(str(source)), transformers.AutoTokenizer.from_pretrained(str(out))
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_prefix[0], ours.eos_id)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (ours.bos_prefix[0], ours.eos_id)
    assert theirs.apply_chat_template(CONVERSATIONS[0], return_dict=False) == ours.encode(
        ours.chat_template.render(CONVERSATIONS[0]))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.dtype == torch.bfloat16


def test_export_refuses_a_bad_dtype_and_a_missing_checkpoint(tmp_path, capsys):
    from cli.main import main

    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "int4"])
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err

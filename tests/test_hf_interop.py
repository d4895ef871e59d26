"""HF Llama interop: logits equal transformers' LlamaForCausalLM in fp32, both directions."""
import dataclasses
import json

import pytest
import torch

from engine.config import ModelConfig
from engine.model.hf_interop import from_hf_state_dict, hf_config, load_hf, save_hf, to_hf_state_dict
from engine.model.decoder import LlamaModel, init_parameters

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                  vocab_size=96, seq_length=48, rope_base=500000.0, norm_eps=1e-5,
                  rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position=64))


def _tokens(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(seed))


def _load_transformers(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("scaled_rope", [False, True])
def test_saved_model_matches_transformers_logits(tmp_path, tie, scaled_rope):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, rope_scaling=CFG.rope_scaling if scaled_rope else None)
    ours = LlamaModel(cfg)
    init_parameters(ours, seed=11)
    # Wider weights than the default init, so attention and RoPE matter to the logits.
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(5.0 if p.ndim == 2 else 1.0)
    save_hf(ours, cfg, tmp_path)
    theirs = _load_transformers(tmp_path)
    x = _tokens(cfg)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_random_transformers_model_loads_with_equal_logits(tmp_path, tie):
    torch.manual_seed(0)
    kwargs = hf_config(dataclasses.replace(CFG, tie_embeddings=tie))
    kwargs["initializer_range"] = 0.1
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    theirs.save_pretrained(tmp_path)
    cfg, state = load_hf(tmp_path)
    assert cfg == dataclasses.replace(CFG, tie_embeddings=tie, init_std=0.1)
    ours = LlamaModel(cfg)
    ours.load_state_dict(state)
    x = _tokens(cfg, seed=1)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-5


def test_state_dict_names_round_trip():
    ours = LlamaModel(CFG)
    hf = to_hf_state_dict(ours.state_dict(), CFG)
    assert "model.layers.2.self_attn.k_proj.weight" in hf and "lm_head.weight" in hf
    assert "model.norm.weight" in hf and "model.embed_tokens.weight" in hf
    assert from_hf_state_dict(hf, CFG).keys() == ours.state_dict().keys()


def test_config_json_has_llama3_rope_and_no_biases(tmp_path):
    save_hf(LlamaModel(CFG).state_dict(), CFG, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"]["rope_type"] == "llama3"
    assert saved["rope_theta"] == 500000.0 and saved["max_position_embeddings"] == 48
    assert saved["attention_bias"] is False and saved["mlp_bias"] is False


def test_qk_norm_is_refused_by_name():
    cfg = dataclasses.replace(CFG, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        to_hf_state_dict(LlamaModel(cfg).state_dict(), cfg)
    with pytest.raises(ValueError, match="qk_norm"):
        hf_config(cfg)

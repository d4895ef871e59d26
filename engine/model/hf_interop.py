"""Hugging Face Llama interop: our state dict <-> LlamaForCausalLM's, config.json, safetensors.

Our parameter names are HF's without the `model.` prefix (and `lm_head.weight` as is), and our
RoPE uses HF's rotate_half convention, so q/k weights map without any permutation. A tied model
has no `lm_head` in either layout. QK-norm and MoE have no HF Llama equivalent and are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from engine.config import ModelConfig

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.qk_norm:
        raise ValueError("model.qk_norm=True: HF LlamaForCausalLM has no QK-norm; export needs qk_norm=false")
    if cfg.num_experts:
        raise ValueError(f"model.num_experts={cfg.num_experts}: HF LlamaForCausalLM is dense; export needs num_experts=0")


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def to_hf_state_dict(state_dict: dict, cfg: ModelConfig) -> dict:
    """Our names -> HF names (`model.embed_tokens.weight`, `model.layers.{i}...`, `lm_head.weight`)."""
    _check_exportable(cfg)
    out = {}
    for name, tensor in state_dict.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # a pipeline stage's copy of the tied embedding
        out[_hf_name(name)] = tensor
    return out


def from_hf_state_dict(hf_sd: dict, cfg: ModelConfig) -> dict:
    """HF names -> our names; drops HF's tied `lm_head.weight` and stale rotary buffers."""
    _check_exportable(cfg)
    out = {}
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers versions saved; we recompute it
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = tensor
        elif name.startswith("model."):
            out[name[len("model."):]] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r} in a HF Llama checkpoint")
    expected = "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    if expected not in out:
        raise ValueError(f"HF checkpoint lacks the tensor for {expected!r} (tie_embeddings={cfg.tie_embeddings})")
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """transformers.LlamaConfig keyword arguments for `cfg`."""
    _check_exportable(cfg)
    out = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        rope_scaling=None,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        out["rope_scaling"] = dict(rope_type="llama3", factor=float(s["factor"]),
                                   low_freq_factor=float(s["low_freq_factor"]),
                                   high_freq_factor=float(s["high_freq_factor"]),
                                   original_max_position_embeddings=int(s["original_max_position"]))
    return out


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a HF Llama config.json dict (transformers 4.x or 5.x key styles)."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json model_type={hf.get('model_type')!r}: only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json {key}=true: biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"config.json head_dim={head_dim}: must equal hidden_size / num_attention_heads")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json rope_type={rope_type!r}: only 'default' and 'llama3' are supported")
    scaling = None
    if rope_type == "llama3":
        scaling = dict(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                       high_freq_factor=rope["high_freq_factor"],
                       original_max_position=rope["original_max_position_embeddings"])
    return ModelConfig(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], seq_length=hf.get("max_position_embeddings", 2048),
        rope_base=float(theta), rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def save_hf(model_or_state_dict: Union[nn.Module, dict], cfg: ModelConfig, out_dir: Union[str, Path]) -> None:
    """Write `out_dir/model.safetensors` and `out_dir/config.json` loadable by LlamaForCausalLM."""
    from safetensors.torch import save_file

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
    dtypes = {v.dtype for v in tensors.values()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / _SAFETENSORS), metadata={"format": "pt"})
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", **hf_config(cfg))
    config["torch_dtype"] = "bfloat16" if dtypes == {torch.bfloat16} else "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_hf(directory: Union[str, Path]) -> tuple[ModelConfig, dict]:
    """Read a HF Llama directory (config.json + safetensors, sharded or not) -> (cfg, our state dict)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()))
    if (directory / _SAFETENSORS).is_file():
        files = [directory / _SAFETENSORS]
    elif (directory / _SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / _SAFETENSORS_INDEX).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{directory}: no {_SAFETENSORS} or {_SAFETENSORS_INDEX}")
    hf_sd: dict[str, Tensor] = {}
    for f in files:
        hf_sd.update(load_file(str(f)))
    return cfg, from_hf_state_dict(hf_sd, cfg)

"""Hugging Face `config.json` <-> ModelConfig: Llama (dense) and Mixtral (MoE), both key styles.

Our decoder is HF's LlamaForCausalLM; with experts it is MixtralForCausalLM, whose router is ours
to the operation: softmax over the experts, the top k kept and renormalised over those k
(engine/model/moe.py; Qwen2-MoE would need norm_topk_prob=true and has a shared expert we lack).
transformers 5 folds `rope_theta` and `rope_scaling` into `rope_parameters` and writes `dtype`
for `torch_dtype`; both styles are read, and `hf_config` writes the installed transformers'
style (the older one when transformers is absent: transformers 5 still reads it).

A config.json field that changes the model in a way our decoder cannot follow (biases, another
activation, a head_dim that is not hidden/heads, sliding windows, another RoPE type, dropout, an
unknown field) is refused with the field named, never silently dropped.
"""
from __future__ import annotations

from importlib import metadata
from typing import Optional

from engine.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
"""The HF model classes our decoder is, by model_type."""

MAPPED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "initializer_range", "rms_norm_eps",
          "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "num_local_experts",
          "num_experts_per_tok", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout",
          "sliding_window", "router_jitter_noise", "model_type", "architectures", "layer_types"}
"""Fields read (or checked) here."""

IGNORED = {
    # Metadata and runtime switches of PretrainedConfig: they change no weight and no logit.
    "transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "output_hidden_states", "output_attentions",
    "return_dict", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "_attn_implementation_autoset", "transformers.js_config",
    # Generation defaults older transformers wrote into config.json.
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # Llama: pretraining_tp only splits the same matmuls into slices.
    "pretraining_tp",
    # Mixtral: training-time switches of its own balance loss (ours: model.moe_aux_loss_coeff).
    "output_router_logits", "router_aux_loss_coef",
}
"""Fields that are accepted and left alone."""

_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def transformers_major() -> Optional[int]:
    """Major version of the installed transformers (None when it is not installed); read from
    its metadata, so exporting never imports it."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse (ValueError naming the field) a model HF Llama / Mixtral cannot hold."""
    if cfg.qk_norm:
        raise ValueError("model.qk_norm=True: HF LlamaForCausalLM / MixtralForCausalLM have no QK-norm; "
                         "export needs qk_norm=false")


def model_type(cfg: ModelConfig) -> str:
    """'mixtral' for a model with experts, else 'llama'."""
    return "mixtral" if cfg.num_experts else "llama"


def hf_config(cfg: ModelConfig, style: Optional[int] = None, tokens: Optional[dict] = None,
              dtype: str = "float32") -> dict:
    """The config.json of `cfg` in transformers `style` (4 or 5; default: the installed one).

    tokens: {bos_token_id, eos_token_id, pad_token_id} of the tokenizer, when known.
    """
    check_exportable(cfg)
    style = style or transformers_major() or 4
    kind = model_type(cfg)
    out = dict(architectures=[ARCHITECTURES[kind]], model_type=kind, vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
               max_position_embeddings=max(cfg.max_position_embeddings or 0, cfg.seq_length),
               initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               attention_dropout=0.0, use_cache=True)
    if kind == "llama":
        out.update(intermediate_size=cfg.ffn_hidden_size, attention_bias=False, mlp_bias=False)
    else:
        out.update(intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size, num_local_experts=cfg.num_experts,
                   num_experts_per_tok=cfg.moe_topk, sliding_window=None, router_jitter_noise=0.0)
    rope = {"rope_type": "default"}
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        rope = dict(rope_type="llama3", **{k: float(s[k]) for k in _ROPE_KEYS},
                    original_max_position_embeddings=int(s["original_max_position"]))
    if style >= 5:
        out["rope_parameters"] = dict(rope, rope_theta=cfg.rope_base)
    else:
        out.update(rope_theta=cfg.rope_base, rope_scaling=rope if cfg.rope_scaling else None)
    out.update(tokens or {})
    out["dtype" if style >= 5 else "torch_dtype"] = dtype
    return out


def _refuse(field: str, value, valid: str) -> None:
    raise ValueError(f"config.json {field}={value!r}: {valid}")


def _rope(hf: dict, default_theta: float) -> tuple[float, Optional[dict]]:
    """(theta, our rope_scaling) from either key style."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        _refuse("rope_parameters", params, "one RoPE for every layer is supported, not one per layer type")
    rope = dict(hf.get("rope_scaling") or {}, **(params or {}))
    theta = hf.get("rope_theta") or rope.get("rope_theta") or default_theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        _refuse("rope_type", kind, "'default' and 'llama3' are supported")
    if kind == "default":
        return float(theta), None
    missing = [k for k in (*_ROPE_KEYS, "original_max_position_embeddings") if k not in rope]
    if missing:
        _refuse("rope_scaling", rope, f"llama3 scaling needs {', '.join(missing)}")
    scaling = {k: float(rope[k]) for k in _ROPE_KEYS}
    scaling["original_max_position"] = int(rope["original_max_position_embeddings"])
    return float(theta), scaling


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig of a HF Llama or Mixtral config.json dict (transformers 4 or 5 key styles);
    ValueError naming the field for anything our decoder cannot reproduce."""
    kind = hf.get("model_type", "llama")
    if kind not in ARCHITECTURES:
        _refuse("model_type", kind, f"supported: {', '.join(ARCHITECTURES)} (Llama, Mixtral)")
    unknown = sorted(k for k in hf if k not in MAPPED and k not in IGNORED)
    if unknown:
        _refuse(unknown[0], hf[unknown[0]], f"Apogee does not know what this field changes in a {kind} model "
                f"(it reads {', '.join(sorted(MAPPED))})")
    for arch in hf.get("architectures") or []:
        if arch != ARCHITECTURES[kind]:
            _refuse("architectures", hf["architectures"], f"expected [{ARCHITECTURES[kind]!r}] for model_type {kind!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(key, hf[key], "biases are not supported")
    for key in ("attention_dropout", "router_jitter_noise"):
        if hf.get(key):
            _refuse(key, hf[key], "must be 0 (Apogee trains without dropout or router noise)")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        _refuse("layer_types", sorted(layer_types), "every layer must be 'full_attention'")
    if hf.get("sliding_window") is not None:
        _refuse("sliding_window", hf["sliding_window"], "sliding-window attention is not supported (null)")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", hf["hidden_act"], "only 'silu' (SwiGLU) is supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        _refuse("head_dim", head_dim, f"must equal hidden_size / num_attention_heads = {hf['hidden_size'] // heads}")
    # Where a field is missing, the default of transformers' LlamaConfig / MixtralConfig.
    mixtral = kind == "mixtral"
    theta, scaling = _rope(hf, 1e6 if mixtral else 10000.0)
    experts = hf.get("num_local_experts", 8) if mixtral else 0
    context = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], seq_length=context, max_position_embeddings=context,
        rope_base=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-5 if mixtral else 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        num_experts=experts, moe_topk=hf.get("num_experts_per_tok", 2) if experts else ModelConfig.moe_topk,
        moe_ffn_hidden_size=hf["intermediate_size"] if experts else None,
    )


def architecture(cfg: ModelConfig) -> dict:
    """The fields that decide a model's weights and its math, by name (what a checkpoint fixes):
    for a MoE model the expert width, not the dense MLP's that it never builds."""
    fields = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                           "norm_eps", "qk_norm", "tie_embeddings", "num_experts")}
    if cfg.num_experts:
        fields.update(moe_topk=cfg.moe_topk, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    else:
        fields["ffn_hidden_size"] = cfg.ffn_hidden_size
    return fields

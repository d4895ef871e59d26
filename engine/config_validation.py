"""Validation of a whole config for a run on N ranks, before any process starts.

`validate()` checks every field and the parallel layout against the world size and raises
`ConfigError` naming the key, the value and what would be valid; it also fills the derived
values (parallel.dp). Fault-injection strings are checked by engine.resilience.faults.
"""
from __future__ import annotations

from typing import Any

from engine.config import ApogeeConfig, ConfigError
from engine.resilience.faults import parse_faults


def _require(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {valid}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, f"expected one of {', '.join(map(str, choices))}")


def resolve_dp(cfg: ApogeeConfig, world_size: int) -> int:
    """Data-parallel size: the configured value, or world / (tp * cp * pp) when left out."""
    p = cfg.parallel
    model_parallel = p.tp * p.cp * p.pp
    if p.dp is None:
        _require(world_size % model_parallel == 0, "parallel", f"tp*cp*pp={model_parallel}", f"must divide the world size {world_size}")
        return world_size // model_parallel
    _require(p.dp * model_parallel == world_size, "parallel.dp", p.dp,
             f"tp*cp*dp*pp = {p.tp}*{p.cp}*{p.dp}*{p.pp} = {p.dp * model_parallel} must equal the world size {world_size}")
    return p.dp


def _validate_grpo(cfg: ApogeeConfig) -> None:
    """The rules of a GRPO run (grpo.inputs set): its layout, precision and rollout settings."""
    from data_pipeline.prompts import reward_function

    g, p, m = cfg.grpo, cfg.parallel, cfg.model
    _require(p.pp == 1 and p.cp == 1, "parallel.pp" if p.pp > 1 else "parallel.cp", max(p.pp, p.cp),
             "GRPO runs with pp=1 and cp=1 (rollouts sample from whole logits of whole sequences); use tp and dp")
    _require(cfg.precision.dtype != "fp8", "precision.dtype", "fp8", "GRPO runs in bf16 or fp32 (the "
             "reference model would share the policy's fp8 scales)")
    _require(m.z_loss_weight == 0, "model.z_loss_weight", m.z_loss_weight,
             "GRPO needs 0: its per-token log-probabilities come from the cross-entropy")
    _require(g.group_size >= 2, "grpo.group_size", g.group_size, "must be >= 2 (advantages are relative to the group)")
    _require(1 <= g.max_new_tokens < m.seq_length, "grpo.max_new_tokens", g.max_new_tokens,
             f"must be in 1..model.seq_length-1 = {m.seq_length - 1} (prompt and completion share a sample)")
    _require(g.temperature >= 0, "grpo.temperature", g.temperature, "must be >= 0 (0 samples greedily)")
    _require(g.clip > 0, "grpo.clip", g.clip, "must be > 0")
    _require(g.kl_coeff >= 0, "grpo.kl_coeff", g.kl_coeff, "must be >= 0 (0 drops the KL term)")
    garbage = [fault for fault in cfg.resilience.inject if str(fault).startswith("garbage_batch")]
    _require(not garbage, "resilience.inject", garbage, "GRPO samples its batches from the policy: "
             "rehearse other faults (kill, raise, hang, bitflip)")
    try:
        reward_function(g.reward)
    except ValueError as error:
        raise ConfigError(f"grpo.reward={g.reward!r}: {error}") from None


def validate(cfg: ApogeeConfig, world_size: int = 1) -> ApogeeConfig:
    """Check every field for a run on `world_size` ranks; fill derived values (parallel.dp)."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
        _require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be positive")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads, f"must divide model.hidden_size={m.hidden_size}")
    _require(m.head_dim % 2 == 0, "model.hidden_size", m.hidden_size, "hidden_size / num_heads must be even (RoPE rotates pairs)")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
    _one_of("model.recompute", m.recompute, ("none", "selective", "full"))
    _require(m.num_experts >= 0, "model.num_experts", m.num_experts, "must be >= 0")
    if m.num_experts:
        _require(1 <= m.moe_topk <= m.num_experts, "model.moe_topk", m.moe_topk, f"must be in 1..num_experts={m.num_experts}")
    if m.rope_scaling is not None:
        needed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position"}
        missing = needed - set(m.rope_scaling)
        _require(not missing, "model.rope_scaling", m.rope_scaling, f"missing {', '.join(sorted(missing))}")

    for key in ("tp", "pp", "cp", "ep", "virtual_stages"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be >= 1")
    _one_of("parallel.zero", p.zero, (0, 1, 2, 3))
    dp = resolve_dp(cfg, world_size)
    _require(m.num_heads % p.tp == 0, "parallel.tp", p.tp, f"must divide model.num_heads={m.num_heads}")
    _require(m.num_kv_heads % p.tp == 0, "parallel.tp", p.tp, f"must divide model.num_kv_heads={m.num_kv_heads}")
    _require(m.ffn_hidden_size % p.tp == 0, "parallel.tp", p.tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _require(m.vocab_size % p.tp == 0, "parallel.tp", p.tp, f"must divide model.vocab_size={m.vocab_size}")
    if p.sequence_parallel:
        _require(m.seq_length % (p.tp * p.cp) == 0, "parallel.sequence_parallel", True,
                 f"needs model.seq_length={m.seq_length} divisible by tp*cp={p.tp * p.cp}")
    if p.cp > 1:
        _require(m.seq_length % (2 * p.cp) == 0, "parallel.cp", p.cp,
                 f"needs model.seq_length={m.seq_length} divisible by 2*cp={2 * p.cp} (load-balanced chunks)")
    chunks = p.pp * p.virtual_stages
    _require(m.num_layers >= chunks, "parallel.pp", p.pp,
             f"pp*virtual_stages={chunks} model chunks need at least that many layers (model.num_layers={m.num_layers})")
    if p.ep > 1:
        _require(m.num_experts > 0, "parallel.ep", p.ep, "expert parallelism needs model.num_experts > 0")
        _require(m.num_experts % p.ep == 0, "parallel.ep", p.ep, f"must divide model.num_experts={m.num_experts}")
        _require((dp * p.cp) % p.ep == 0, "parallel.ep", p.ep, f"must divide dp*cp={dp * p.cp}")
        _require(p.zero == 0, "parallel.zero", p.zero,
                 "expert parallelism (parallel.ep > 1) works with zero=0 only for now (expert weights "
                 "reduce over the expert-dp group, which the ZeRO buffers do not shard over)")
    if m.num_experts:
        _require(p.tp == 1, "parallel.tp", p.tp,
                 "MoE models (model.num_experts > 0) need tp=1 for now: expert tensor parallelism is "
                 "not implemented; spread the experts with parallel.ep instead")

    if m.tie_embeddings and p.pp > 1:
        # The two stages' copies are summed through main_grad, which the ZeRO buffers do not keep.
        _require(p.zero == 0, "parallel.zero", p.zero,
                 "tied embeddings across pipeline stages (model.tie_embeddings with parallel.pp > 1) "
                 "work with zero=0 only for now")
    _require(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
             f"must be a multiple of micro_batch_size*dp = {t.micro_batch_size}*{dp} = {per_step}")
    microbatches = t.global_batch_size // per_step
    if p.pp > 1 and p.virtual_stages > 1:
        _require(microbatches % p.pp == 0, "train.global_batch_size", t.global_batch_size,
                 f"interleaved 1F1B needs the microbatch count ({microbatches}) divisible by pp={p.pp}")
    _require(t.log_interval >= 1, "train.log_interval", t.log_interval, "must be >= 1")

    _one_of("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _one_of("optim.wsd_decay_style", o.wsd_decay_style, ("linear", "cosine", "sqrt"))
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)")
    _require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")

    _one_of("precision.dtype", cfg.precision.dtype, ("fp32", "bf16", "fp8"))
    stages = [f"{stage}.inputs" for stage in ("sft", "dpo", "grpo") if getattr(cfg, stage).inputs]
    _require(len(stages) <= 1, stages[-1] if stages else "sft.inputs", "set",
             f"a run trains GRPO prompts, SFT examples or DPO pairs, only one of them (set: {', '.join(stages)})")
    if cfg.dpo.inputs:
        _require(p.pp == 1 and p.cp == 1, "parallel.pp" if p.pp > 1 else "parallel.cp", max(p.pp, p.cp),
                 "DPO runs with pp=1 and cp=1 (a pair's log-probabilities must be whole before the sigmoid); "
                 "use tp and dp")
        _require(cfg.precision.dtype != "fp8", "precision.dtype", "fp8", "DPO runs in bf16 or fp32 (the "
                 "reference model would share the policy's fp8 scales)")
        _require(cfg.dpo.beta > 0, "dpo.beta", cfg.dpo.beta, "must be > 0")
    if cfg.grpo.inputs:
        _validate_grpo(cfg)
    _require(cfg.sft.lora_rank >= 0, "sft.lora_rank", cfg.sft.lora_rank, "must be >= 0 (0: no adapters)")
    if cfg.sft.lora_rank:
        _require(cfg.precision.dtype != "fp8", "precision.dtype", "fp8", "LoRA adapters run in bf16 or fp32 for now")
        _require(p.zero == 0, "parallel.zero", p.zero, "LoRA trains a few adapters: ZeRO has nothing to shard; use zero=0")
    if cfg.precision.dtype == "fp8":
        _require(not t.compile, "train.compile", t.compile,
                 "precision.dtype=fp8 runs eagerly (its emulated GEMMs record amaxes in Python state); "
                 "set train.compile=false")
    _require(cfg.checkpoint.interval >= 0, "checkpoint.interval", cfg.checkpoint.interval, "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    if cfg.data.weights is not None:
        _require(len(cfg.data.weights) == len(cfg.data.inputs), "data.weights", cfg.data.weights,
                 f"needs one weight per input ({len(cfg.data.inputs)} inputs)")
        _require(all(w >= 0 for w in cfg.data.weights) and sum(cfg.data.weights) > 0, "data.weights",
                 cfg.data.weights, "weights must be >= 0 with a positive sum")
    _require(len(cfg.data.inputs) >= 1, "data.inputs", cfg.data.inputs, "needs at least one input")
    r = cfg.resilience
    _require(r.max_restarts >= 0, "resilience.max_restarts", r.max_restarts, "must be >= 0")
    _require(r.hang_timeout_s >= 0, "resilience.hang_timeout_s", r.hang_timeout_s, "must be >= 0 (0 disables the watchdog)")
    parse_faults(r.inject, world_size)
    cfg.parallel.dp = dp
    return cfg

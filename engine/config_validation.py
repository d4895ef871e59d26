"""Validation of a whole config for a run on N ranks, before any process starts.

`validate()` checks every field and the parallel layout against the world size and raises
`ConfigError` naming the key, the value and what would be valid; it also fills the derived
values (parallel.dp). Fault-injection strings are checked by engine.resilience.faults; a stage
checks its own sections (engine/stage.py, Stage.validate) after this.
"""
from __future__ import annotations

from typing import Any

from engine.config import ApogeeConfig, ConfigError
from engine.model.fp8.backend import BACKENDS, alignment_problem, choose_backend, hardware_problem
from engine.model.fp8.recipes import RECIPES
from engine.model.lora import TARGETS as LORA_TARGETS
from engine.resilience.determinism import MODES
from engine.resilience.faults import parse_faults


def require(cond: bool, key: str, value: Any, valid: str) -> None:
    """Raise ConfigError("key=value: valid") unless `cond` (stages check their sections with it too)."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {valid}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    require(value in choices, key, value, f"expected one of {', '.join(map(str, choices))}")


def check_run_name(name: str) -> None:
    """A run name is one folder under runs/: not empty, no path separator, not '.' or '..' (so that
    `--set name=../../x` cannot put a run outside runs/; --run-dir is where a run goes anywhere else)."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name
    require(plain, "name", name, "a run name is one folder name under runs/ (no '/', not '.' or '..'); "
            "to write the run elsewhere, give --run-dir")


def _validate_fp8(cfg: ApogeeConfig) -> None:
    """precision.fp8_*: known values always; with dtype=fp8, the recipe's knobs, shapes and hardware."""
    pr, m, p = cfg.precision, cfg.model, cfg.parallel
    _one_of("precision.fp8_recipe", pr.fp8_recipe, RECIPES)
    if pr.fp8_format is not None:
        _one_of("precision.fp8_format", pr.fp8_format, ("hybrid", "e4m3"))
    _one_of("precision.fp8_amax_compute_algo", pr.fp8_amax_compute_algo, ("max", "most_recent"))
    _one_of("precision.fp8_backend", pr.fp8_backend, BACKENDS)
    require(pr.fp8_amax_history_len >= 1, "precision.fp8_amax_history_len", pr.fp8_amax_history_len, "must be >= 1")
    for key in ("fp8_first_layers_bf16", "fp8_last_layers_bf16"):
        require(getattr(pr, key) >= 0, f"precision.{key}", getattr(pr, key), "must be >= 0")
    if pr.dtype != "fp8":
        return
    recipe = f"precision.fp8_recipe={pr.fp8_recipe}"
    if pr.fp8_recipe != "delayed":  # knobs of TE's DelayedScaling only: refused rather than ignored
        for key, default in (("fp8_margin", 0), ("fp8_amax_history_len", 1024), ("fp8_amax_compute_algo", "max")):
            require(getattr(pr, key) == default, f"precision.{key}", getattr(pr, key),
                    f"used by precision.fp8_recipe=delayed only ({recipe}); leave it at {default!r}")
    else:
        require(not pr.fp8_power_2_scales, "precision.fp8_power_2_scales", True,
                "tensorwise and blockwise only (delayed scaling's scales are not rounded; mxfp8's always are)")
    bf16_layers = pr.fp8_first_layers_bf16 + pr.fp8_last_layers_bf16
    require(bf16_layers <= m.num_layers, "precision.fp8_first_layers_bf16", pr.fp8_first_layers_bf16,
            f"first + last bf16 layers ({bf16_layers}) exceed model.num_layers={m.num_layers}")
    require(not cfg.train.compile, "train.compile", cfg.train.compile,
            "precision.dtype=fp8 runs eagerly (its emulated GEMMs keep amax state between calls); set train.compile=false")
    tokens = cfg.train.micro_batch_size * m.seq_length // p.cp
    problem = alignment_problem(pr.fp8_recipe, m, p.tp, tokens)
    require(problem is None, "precision.fp8_recipe", pr.fp8_recipe, problem or "")
    _check_fp8_hardware(cfg)


def _check_fp8_hardware(cfg: ApogeeConfig) -> None:
    """Where this process sees a GPU and Transformer Engine would run: the recipe must run on it."""
    import torch

    pr = cfg.precision
    if not torch.cuda.is_available():
        return  # CPU: the emulation runs every recipe
    backend, _ = choose_backend(pr.fp8_backend, torch.device("cuda"))
    if backend != "te":
        return
    problem = hardware_problem(pr.fp8_recipe, torch.cuda.get_device_capability(), torch.version.cuda)
    require(problem is None, "precision.fp8_recipe", pr.fp8_recipe, problem or "")
    require(cfg.model.recompute == "none", "model.recompute", cfg.model.recompute,
            "Transformer Engine's fp8 layers are not recomputed by Apogee's activation checkpointing yet; set "
            "model.recompute=none or precision.fp8_backend=emulation")
    if pr.fp8_recipe == "delayed":
        # TE moves delayed scales at every autocast exit, so a re-run of a step sees other scales.
        require(cfg.resilience.audit_interval == 0, "resilience.audit_interval", cfg.resilience.audit_interval,
                "a replay audit must recompute a step bit for bit, which Transformer Engine's delayed scaling "
                "(scales updated per microbatch) does not; use precision.fp8_recipe=tensorwise, blockwise or "
                "mxfp8, or precision.fp8_backend=emulation")


def resolve_dp(cfg: ApogeeConfig, world_size: int) -> int:
    """Data-parallel size: the configured value, or world / (tp * cp * pp) when left out."""
    p = cfg.parallel
    model_parallel = p.tp * p.cp * p.pp
    if p.dp is None:
        require(world_size % model_parallel == 0, "parallel", f"tp*cp*pp={model_parallel}", f"must divide the world size {world_size}")
        return world_size // model_parallel
    require(p.dp * model_parallel == world_size, "parallel.dp", p.dp,
             f"tp*cp*dp*pp = {p.tp}*{p.cp}*{p.dp}*{p.pp} = {p.dp * model_parallel} must equal the world size {world_size}")
    return p.dp


def validate(cfg: ApogeeConfig, world_size: int = 1) -> ApogeeConfig:
    """Check every field for a run on `world_size` ranks; fill derived values (parallel.dp)."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    check_run_name(cfg.name)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
        require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be positive")
    require(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads, f"must divide model.hidden_size={m.hidden_size}")
    require(m.head_dim % 2 == 0, "model.hidden_size", m.hidden_size, "hidden_size / num_heads must be even (RoPE rotates pairs)")
    require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
    _one_of("model.recompute", m.recompute, ("none", "selective", "full"))
    require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0 (the std of the normal initialisation)")
    require(m.num_experts >= 0, "model.num_experts", m.num_experts, "must be >= 0")
    if m.num_experts:
        require(1 <= m.moe_topk <= m.num_experts, "model.moe_topk", m.moe_topk, f"must be in 1..num_experts={m.num_experts}")
    if m.max_position_embeddings is not None:
        require(m.max_position_embeddings > 0, "model.max_position_embeddings", m.max_position_embeddings,
                "must be positive (or null: model.seq_length)")
    if m.rope_scaling is not None:
        needed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position"}
        missing = needed - set(m.rope_scaling)
        require(not missing, "model.rope_scaling", m.rope_scaling, f"missing {', '.join(sorted(missing))}")

    for key in ("tp", "pp", "cp", "ep", "virtual_stages"):
        require(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be >= 1")
    _one_of("parallel.zero", p.zero, (0, 1, 2, 3))
    require(isinstance(p.overlap_param_gather, bool), "parallel.overlap_param_gather", p.overlap_param_gather,
            "must be true or false (ZeRO-1/2 only; stage 3 gathers per layer ahead of use anyway)")
    dp = resolve_dp(cfg, world_size)
    require(m.num_heads % p.tp == 0, "parallel.tp", p.tp, f"must divide model.num_heads={m.num_heads}")
    require(m.num_kv_heads % p.tp == 0, "parallel.tp", p.tp, f"must divide model.num_kv_heads={m.num_kv_heads}")
    require(m.ffn_hidden_size % p.tp == 0, "parallel.tp", p.tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    require(m.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by,
            "must be >= 1 (1: no padding)")
    require(m.padded_vocab_size % p.tp == 0, "parallel.tp", p.tp,
            f"must divide the padded vocabulary {m.padded_vocab_size} (model.vocab_size={m.vocab_size} rounded up to a "
            f"multiple of model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by}); choose a "
            f"make_vocab_size_divisible_by that tp divides")
    if p.sequence_parallel:
        require(m.seq_length % (p.tp * p.cp) == 0, "parallel.sequence_parallel", True,
                 f"needs model.seq_length={m.seq_length} divisible by tp*cp={p.tp * p.cp}")
    if p.cp > 1:
        require(m.seq_length % (2 * p.cp) == 0, "parallel.cp", p.cp,
                 f"needs model.seq_length={m.seq_length} divisible by 2*cp={2 * p.cp} (load-balanced chunks)")
    for key in ("document_mask", "reset_position_ids"):
        value = getattr(cfg.data, key)
        require(isinstance(value, bool), f"data.{key}", value, "must be true or false")
    chunks = p.pp * p.virtual_stages
    require(m.num_layers >= chunks, "parallel.pp", p.pp,
             f"pp*virtual_stages={chunks} model chunks need at least that many layers (model.num_layers={m.num_layers})")
    if p.ep > 1:
        require(m.num_experts > 0, "parallel.ep", p.ep, "expert parallelism needs model.num_experts > 0")
        require(m.num_experts % p.ep == 0, "parallel.ep", p.ep, f"must divide model.num_experts={m.num_experts}")
        require((dp * p.cp) % p.ep == 0, "parallel.ep", p.ep, f"must divide dp*cp={dp * p.cp}")
        require(p.zero == 0, "parallel.zero", p.zero,
                 "expert parallelism (parallel.ep > 1) works with zero=0 only for now (expert weights "
                 "reduce over the expert-dp group, which the ZeRO buffers do not shard over)")
    if m.num_experts:
        require(p.tp == 1, "parallel.tp", p.tp,
                 "MoE models (model.num_experts > 0) need tp=1 for now: expert tensor parallelism is "
                 "not implemented; spread the experts with parallel.ep instead")

    if m.tie_embeddings and p.pp > 1:
        # The two stages' copies are summed through main_grad, which the ZeRO buffers do not keep.
        require(p.zero == 0, "parallel.zero", p.zero,
                 "tied embeddings across pipeline stages (model.tie_embeddings with parallel.pp > 1) "
                 "work with zero=0 only for now")
    require(t.steps >= 0, "train.steps", t.steps, "must be >= 0")
    if t.epochs is not None:
        require(t.epochs > 0, "train.epochs", t.epochs, "must be > 0 (or null: train.steps)")
    require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    per_step = t.micro_batch_size * dp
    require(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
             f"must be a multiple of micro_batch_size*dp = {t.micro_batch_size}*{dp} = {per_step}")
    microbatches = t.global_batch_size // per_step
    if p.pp > 1 and p.virtual_stages > 1:
        require(microbatches % p.pp == 0, "train.global_batch_size", t.global_batch_size,
                 f"interleaved 1F1B needs the microbatch count ({microbatches}) divisible by pp={p.pp}")
    require(t.log_interval >= 1, "train.log_interval", t.log_interval, "must be >= 1")
    require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0 (0: no validation)")
    require(t.eval_iters >= 1, "train.eval_iters", t.eval_iters, "must be >= 1")
    from data_pipeline import DataError
    from data_pipeline.gpt_dataset import split_fractions
    try:
        split_fractions(cfg.data.split)
    except DataError as error:
        raise ConfigError(str(error)) from None

    _one_of("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _one_of("optim.wsd_decay_style", o.wsd_decay_style, ("linear", "cosine", "sqrt"))
    _one_of("optim.grad_reduce_dtype", o.grad_reduce_dtype, ("fp32", "bf16"))
    require(not (o.grad_reduce_dtype == "bf16" and p.zero == 3), "optim.grad_reduce_dtype", o.grad_reduce_dtype,
            "is fp32 only with parallel.zero=3 (its per-layer reduce-scatter has no bf16 path); use zero 0-2 or fp32")
    require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    if o.schedule in ("cosine", "wsd"):  # the schedules that decay to min_lr; constant never reads it
        require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}] "
                f"(optim.schedule={o.schedule} decays to it)")
    require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
            "must be >= 0 (decoupled decay shrinks the weights; a negative one grows them without bound)")
    require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)")
    require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")

    _one_of("precision.dtype", cfg.precision.dtype, ("fp32", "bf16", "fp8"))
    lora = cfg.lora
    require(lora.rank >= 0, "lora.rank", lora.rank, "must be >= 0 (0: no adapters)")
    if lora.rank:
        require(lora.alpha > 0, "lora.alpha", lora.alpha, "must be > 0")
        unknown = [name for name in lora.targets if name not in LORA_TARGETS]
        require(lora.targets and not unknown, "lora.targets", lora.targets,
                f"a non-empty list of {', '.join(LORA_TARGETS)}")
        require(cfg.precision.dtype != "fp8", "precision.dtype", "fp8", "LoRA adapters run in bf16 or fp32 for now")
        require(p.zero == 0, "parallel.zero", p.zero, "LoRA trains a few adapters: ZeRO has nothing to shard; use zero=0")
    _validate_fp8(cfg)
    require(cfg.checkpoint.interval >= 0, "checkpoint.interval", cfg.checkpoint.interval, "must be >= 0")
    require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    require(cfg.checkpoint.memory_interval >= 0, "checkpoint.memory_interval", cfg.checkpoint.memory_interval,
            "must be >= 0 (0: no memory snapshots)")
    if cfg.data.weights is not None:
        require(len(cfg.data.weights) == len(cfg.data.inputs), "data.weights", cfg.data.weights,
                 f"needs one weight per input ({len(cfg.data.inputs)} inputs)")
        require(all(w >= 0 for w in cfg.data.weights) and sum(cfg.data.weights) > 0, "data.weights",
                 cfg.data.weights, "weights must be >= 0 with a positive sum")
    require(len(cfg.data.inputs) >= 1, "data.inputs", cfg.data.inputs, "needs at least one input")
    r = cfg.resilience
    require(r.max_restarts >= 0, "resilience.max_restarts", r.max_restarts, "must be >= 0")
    require(r.hang_timeout_s >= 0, "resilience.hang_timeout_s", r.hang_timeout_s, "must be >= 0 (0 disables the watchdog)")
    require(r.deterministic in MODES, "resilience.deterministic", r.deterministic, f"expected one of {', '.join(MODES)}")
    require(r.straggler_factor == 0 or r.straggler_factor > 1, "resilience.straggler_factor", r.straggler_factor,
            "must be > 1 (a slowdown ratio), or 0 to disable straggler detection")
    require(r.abft_interval >= 0, "resilience.abft_interval", r.abft_interval, "must be >= 0 (0 disables ABFT checks)")
    require(r.spike_sigmas >= 0, "resilience.spike_sigmas", r.spike_sigmas,
            "must be >= 0 (0: a loss spike is the ratio to the median alone)")
    require(r.collective_timeout_s > 0, "resilience.collective_timeout_s", r.collective_timeout_s, "must be > 0 (seconds)")
    for fault in parse_faults(r.inject, world_size):
        # Gradients are flipped in the fp32 main gradient; parameters and activations in the model's
        # dtype, 16 bits wide in bf16 and fp8 runs (sign 15, exponent 14-7, mantissa 6-0).
        if fault.kind == "bitflip" and fault.target != "grad" and cfg.precision.dtype in ("bf16", "fp8"):
            require(max(fault.bits) <= 15, f"resilience.inject[{fault.index}]", fault.spec,
                    f"bit {max(fault.bits)} of a {fault.target}: with precision.dtype={cfg.precision.dtype} it is a "
                    f"16-bit bf16 value (bits 0..15: 15 sign, 14-7 exponent, 6-0 mantissa)")
    cfg.parallel.dp = dp
    return cfg

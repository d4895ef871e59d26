"""Run configuration: dataclasses with one docstring per field, YAML files, `--set` overrides.

A config is built in three layers: dataclass defaults <- a YAML file <- `--set a.b=c` overrides
(the value parsed as YAML). `validate()` then checks every field before any process starts and
raises `ConfigError` naming the key, the value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from parallel.layout import ParallelLayout
from engine.config_precision import PrecisionConfig  # noqa: F401 (a section of ApogeeConfig, imported from here)
from engine.config_resilience import ResilienceConfig  # noqa: F401 (likewise)
from engine.run_files import write_run_file


class ConfigError(ValueError):
    """A config key has a value that cannot be used; the message names key, value and the valid set."""


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder."""

    hidden_size: int = 128
    """Model width h."""
    num_layers: int = 2
    """Number of transformer layers L."""
    num_heads: int = 4
    """Attention (query) heads a."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    ffn_hidden_size: int = 352
    """Inner width of the SwiGLU MLP."""
    vocab_size: int = 384
    """Token ids the model knows; at least the tokenizer's vocabulary."""
    make_vocab_size_divisible_by: int = 128
    """The embedding and output rows are vocab_size rounded up to a multiple of this (Megatron's
    make_vocab_size_divisible_by); the extra rows never receive probability. A function of the model
    alone, never of the layout, so checkpoints stay layout-free; parallel.tp must divide the result."""
    seq_length: int = 128
    """Tokens per training sample (each sample reads seq_length + 1 tokens)."""
    rope_base: float = 10000.0
    """RoPE theta."""
    rope_scaling: Optional[dict] = None
    """Llama-3 frequency scaling: {factor, low_freq_factor, high_freq_factor, original_max_position}."""
    max_position_embeddings: Optional[int] = None
    """Longest context the model is meant for (Hugging Face's max_position_embeddings, kept through
    train.init_from and export); None means seq_length. Changes nothing in training."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before RoPE."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""
    z_loss_weight: float = 0.0
    """Weight of the z-loss (log-sum-exp squared of the logits); 0 disables it."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (whole layer)."""
    num_experts: int = 0
    """Experts per MoE layer; 0 means dense MLPs everywhere."""
    moe_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of each expert (default ffn_hidden_size)."""
    moe_aux_loss_coeff: float = 1e-3
    """Weight of the sequence-wise load-balancing loss (DeepSeek-V3); 0 disables it."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size / num_heads)."""
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the output layer: vocab_size rounded up to make_vocab_size_divisible_by."""
        step = max(1, self.make_vocab_size_divisible_by)
        return -(-self.vocab_size // step) * step


@dataclass
class DataConfig:
    """Where tokens come from."""

    inputs: list = field(default_factory=lambda: ["stdlib"])
    """Dataset prefixes (PREFIX.bin/.idx), or raw inputs to preprocess on first use ('stdlib')."""
    weights: Optional[list] = None
    """Blend weights, one per input (default: proportional to nothing - equal weights)."""
    phases: Optional[list] = None
    """Mixture schedule: list of {start_step, weights}; overrides `weights` from each start_step."""
    tokenizer: str = "byte"
    """'byte', the path of a Hugging Face tokenizer.json, or a directory holding one (its
    tokenizer_config.json declares BOS, EOS, pad and the chat template: data_pipeline/tokenizer.py)."""
    cache_dir: str = ".cache/apogee"
    """Where preprocessed corpora and built sample indices are cached."""
    prefetch: int = 2
    """Batches prepared ahead by the loader's background worker."""
    skip_steps: list = field(default_factory=list)
    """Data batches never trained on (filled by loss-spike rewinds)."""
    split: str = "1,0,0"
    """Megatron's train,valid,test split of each input's documents, e.g. '969,30,1' (the same documents
    and order as megatron-core's builder); training reads the first part, validation the second."""
    valid_inputs: list = field(default_factory=list)
    """Validation datasets (prefixes or raw inputs, like `inputs`, equal weights) instead of a split."""
    document_mask: bool = False
    """Attention within each document of a sample (.idx sequences), its first target untrained (data_pipeline/documents.py)."""
    reset_position_ids: bool = False
    """RoPE positions restart at 0 at each document of a sample (Megatron's --reset-position-ids)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    schedule: str = "cosine"
    """cosine (warmup + cosine), wsd (warmup-stable-decay) or constant (after warmup)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_steps: Optional[int] = None
    """Steps from the end of warmup to min_lr (default: train.steps - warmup_steps)."""
    wsd_decay_start: Optional[int] = None
    """WSD: the step where the decay begins (default: 80% of train.steps)."""
    wsd_decay_style: str = "linear"
    """WSD decay shape: linear, cosine or sqrt (1 - sqrt)."""
    grad_reduce_dtype: str = "fp32"
    """Data-parallel gradient reduction: fp32, or bf16 (half the bytes; accumulation stays fp32)."""


@dataclass
class TrainConfig:
    """The step loop."""

    steps: int = 200
    """Optimizer steps to run."""
    epochs: Optional[float] = None
    """Passes over a stage's own examples (SFT, DPO, GRPO): when set, train.steps becomes
    ceil(epochs * examples / global_batch_size), unless train.steps is set too (then train.steps
    wins and epochs is dropped, as TRL's max_steps wins over num_train_epochs). None: train.steps."""
    micro_batch_size: int = 4
    """Samples per microbatch per data-parallel rank."""
    global_batch_size: int = 16
    """Samples per optimizer step across all data-parallel ranks."""
    init_from: Optional[str] = None
    """Weights to start from (fine-tuning, mid-training): an Apogee checkpoint directory (any
    layout; a run's checkpoints/ directory means its latest) or a Hugging Face Llama / Mixtral
    directory, whose config.json then sets the model (engine/state/init_from.py). Only the
    weights: optimizer, step and data start fresh. None starts from the seed's
    initialisation; a run resuming its own checkpoint ignores it."""
    log_interval: int = 1
    """Steps between console log lines."""
    eval_interval: int = 0
    """Steps between validation passes (and one after the last step); 0 never validates."""
    eval_iters: int = 10
    """Global batches per validation pass (the same batches every time, so passes compare)."""
    compile: bool = False
    """torch.compile each decoder layer (engine/model/compile.py): fuses the element-wise work around the
    matmuls; costs a one-off compile at start (about a minute on CPU)."""


@dataclass
class LoRAConfig:
    """LoRA adapters (engine/model/lora.py): any stage can train them instead of every weight."""

    rank: int = 0
    """Rank r of the adapters on every target layer, the base weights frozen; 0 trains every weight."""
    alpha: float = 16.0
    """Scale numerator: the adapter path is multiplied by alpha / rank."""
    targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"])
    """Decoder linear layers that carry adapters (of q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj); MoE expert stacks never do."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint)."""

    interval: int = 0
    """Steps between checkpoints; 0 disables periodic checkpoints."""
    dir: Optional[str] = None
    """Checkpoint directory (default RUN_DIR/checkpoints)."""
    keep: int = 3
    """Checkpoints kept on disk."""
    async_save: bool = True
    """Write in the background while training continues."""
    allow_other_run: bool = False
    """Accept a checkpoint written by another run (branching, fine-tuning from a base model)."""
    memory_interval: int = 0
    """Steps between in-memory snapshots (0: off). Each rank sends its shard to the keeper process of
    its failure domain and of the next one (engine/state/memory_snapshots.py); a restart reloads the
    freshest complete set from them, without reading the disk, when it is at least as new as the
    newest disk checkpoint. Costs host memory: each keeper holds 2 snapshots of its own ranks' state
    and 2 of its peer domain's."""


@dataclass
class LoggingConfig:
    """What the run writes besides checkpoints."""

    tensorboard: bool = True
    """Write TensorBoard scalars under RUN_DIR/tensorboard."""


@dataclass
class ApogeeConfig:
    """A whole run."""

    name: str = "tiny"
    """Run name; the default run directory is runs/<name>."""
    seed: int = 1234
    """Seed of weights, data order and every RNG stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Step loop."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerics."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters (off unless lora.rank > 0)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    """Fault tolerance."""

    def __post_init__(self):
        self.sections: dict = {}
        """The running stage's config sections (engine/stage.py), by name: `cfg.<section>` reads one."""
        self.foreign: dict = {}
        """Sections of other stages found in the config (accepted for old config files, never run)."""
        self.explicit: frozenset = frozenset()
        """'section.field' keys the user set (the --config file and --set), as opposed to defaults and
        a stage's preset: the values a checkpoint's own (train.init_from) must not silently replace."""

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: a stage's own section (cfg.<section>).
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"the config has no section {name!r} (a stage's sections exist only in its runs)")

    def to_dict(self) -> dict:
        """Plain nested dict (for YAML and checkpoints): the engine's sections and the stage's."""
        data = dataclasses.asdict(self)
        data.update({name: dataclasses.asdict(section) for name, section in self.sections.items()})
        return data


# ---------------------------------------------------------------------------------------------
# Building a config from dicts, files and overrides


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to the field's type, or raise ConfigError naming the key."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if hint is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}={value!r}: expected a list")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}={value!r}: expected a mapping")
    return value


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from nested dict `values`, checking names and types; at the top
    of a run's config, stage sections (ApogeeConfig.sections / .foreign) are fields too."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    sections = {**obj.foreign, **obj.sections} if isinstance(obj, ApogeeConfig) else {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names and name not in sections:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join([*names, *(obj.sections if isinstance(obj, ApogeeConfig) else [])])}")
        current = getattr(obj, name) if name in names else sections[name]
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _check_type(key, value, hints[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=c' into ('a.b', parsed YAML value of c)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _with_sections(sections: Optional[Mapping[str, type]], foreign: Optional[Mapping[str, type]]) -> ApogeeConfig:
    cfg = ApogeeConfig()
    cfg.sections = {name: cls() for name, cls in (sections or {}).items()}
    cfg.foreign = {name: cls() for name, cls in (foreign or {}).items()}
    return cfg


def _read_yaml(path: str | Path, option: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{option} {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {path}: expected a mapping at the top level")
    return data


def _keys(data: dict) -> set[str]:
    """'section.field' (or 'field' at the top level) of every value in a nested config dict."""
    return {f"{name}.{field}" if isinstance(value, dict) else name
            for name, value in data.items() for field in (value if isinstance(value, dict) else [None])}


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                sections: Optional[Mapping[str, type]] = None,
                foreign: Optional[Mapping[str, type]] = None,
                preset: Optional[str | Path] = None) -> ApogeeConfig:
    """Build a config from defaults, a preset, an optional YAML file and `key=value` overrides.

    `sections` are the running stage's config sections (name -> dataclass), `foreign` those of
    other stages, accepted but not run (engine/stage.py). `preset` (a stage's default config)
    sits between the defaults and the file; what the file and the overrides set is recorded in
    `cfg.explicit`.
    """
    cfg = _with_sections(sections, foreign)
    explicit: set[str] = set()
    if preset is not None:
        _merge(cfg, _read_yaml(preset, "preset"))
    if path is not None:
        data = _read_yaml(path, "--config")
        _merge(cfg, data)
        explicit |= _keys(data)
    for text in overrides or []:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
        explicit |= _keys(_nest(key, value))
    cfg.explicit = frozenset(explicit)
    return cfg


def config_from_dict(data: dict, sections: Optional[Mapping[str, type]] = None,
                     foreign: Optional[Mapping[str, type]] = None) -> ApogeeConfig:
    """Rebuild a config saved with `to_dict()` (run directories, checkpoints)."""
    cfg = _with_sections(sections, foreign)
    _merge(cfg, data)
    return cfg


def save_config(cfg: ApogeeConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (never through a symlink planted in its place)."""
    write_run_file(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

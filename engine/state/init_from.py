"""Starting a run from another run's weights: an Apogee checkpoint of any layout, or a Hugging
Face Llama / Mixtral directory (fine-tuning, and any stage that continues a pre-trained model).

Only the weights travel: the optimizer starts fresh (its fp32 masters are re-read from the
loaded weights; for a bf16 run those are the bf16 values), the step count, the data position and
the RNG start at zero. An Apogee checkpoint is read through DCP into this rank's shards, so the
source and the new run may have different layouts; from a Hugging Face directory each rank reads
only its slice of each tensor (engine/model/hf_slices.py: tensor- and expert-parallel alike).

A Hugging Face directory also brings its architecture (`adopt_hf_architecture`, when the config
is loaded): every model field config.json fixes is taken from it. A value the user set (the
--config file or --set) that contradicts it is an error, except the ones a later stage is meant
to change (`CHANGEABLE`: the context and its RoPE), which are printed. `check_init_source`
validates the source against the run's model before any rank starts, verifying its checksums and
reading its DCP metadata through the restricted unpickler (engine/state/safe_load.py); the ranks
then load it without unpickling anything else.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine.state.checkpoint_store import CheckpointError, read_manifest, recorded_model, resolve_checkpoint
from engine.state.safe_load import read_metadata, safe_load
from engine.state.views import model_views, sync_masters
from engine.config import ApogeeConfig, ConfigError, ModelConfig
from engine.model.hf_config import architecture
from parallel.sharding import shard_of

SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "padded_vocab_size", "qk_norm", "tie_embeddings", "num_experts", "moe_ffn_hidden_size")
"""Model fields that must agree between an Apogee checkpoint and the run (not seq_length, RoPE or
the loss settings, which a later stage may change). The padded vocabulary (the rows the checkpoint
holds) counts, not model.make_vocab_size_divisible_by itself: 384 rows are 384 rows at 1 or 128."""

CHANGEABLE = {
    "rope_scaling": "long-context extension (Llama 3's frequency scaling)",
    "rope_base": "long-context extension by a larger RoPE base (Xiong et al. 2023)",
    "max_position_embeddings": "the context the model is meant for",
    "init_std": "only the initialisation of weights the checkpoint does not hold",
}
"""Model fields config.json sets that a run may change, and why (a change is printed)."""


def resolve_source(source: str, hashes: bool = True) -> tuple[str, Path]:
    """('hf' | 'apogee', directory) of an init_from path; a checkpoints/ directory means its newest
    intact one (hashes=False: manifest and sizes only, for ranks after the launcher verified it)."""
    path = Path(source)
    if (path / "config.json").is_file():
        return "hf", path
    try:
        return "apogee", resolve_checkpoint(source, "train.init_from", hashes=hashes)
    except CheckpointError as error:
        raise ConfigError(f"train.init_from={source!r}: not a Hugging Face directory (config.json) nor an "
                          f"intact Apogee checkpoint ({error.reason})") from None


def _hf_model(path: Path, source: str) -> ModelConfig:
    from engine.model.hf_interop import read_hf_config

    try:
        return read_hf_config(path)
    except ValueError as error:
        raise ConfigError(f"train.init_from={source!r}: {error}") from None


def _source_model(kind: str, path: Path, source: str) -> ModelConfig:
    if kind == "hf":
        return _hf_model(path, source)
    return ModelConfig(**recorded_model(read_manifest(path)["metadata"]["model"]))


def _explicit(cfg: ApogeeConfig, field: str) -> bool:
    return f"model.{field}" in cfg.explicit


def adopt_hf_architecture(cfg: ApogeeConfig) -> None:
    """With train.init_from a Hugging Face directory, take the model from its config.json (and its
    tokenizer, unless data.tokenizer is set): a contradicting value the user set is a ConfigError,
    a changed CHANGEABLE one is printed. Other sources leave `cfg` alone."""
    source = cfg.train.init_from
    if not source or not (Path(source) / "config.json").is_file():
        return
    theirs, mine = _hf_model(Path(source), source), cfg.model
    wanted, current = architecture(theirs), architecture(mine)
    contradictions = []
    for field, value in wanted.items():
        here = current.get(field, getattr(mine, field))
        if here == value:
            continue
        # The experts' width is moe_ffn_hidden_size, or ffn_hidden_size where that is left out.
        keys = (field, "ffn_hidden_size") if field == "moe_ffn_hidden_size" and not mine.moe_ffn_hidden_size else (field,)
        if any(_explicit(cfg, key) for key in keys):
            contradictions.append(f"model.{keys[-1]}={getattr(mine, keys[-1])!r} here, {value!r} in the checkpoint")
        else:
            setattr(mine, field, value)
    if contradictions:
        raise ConfigError(f"train.init_from={source!r}: the config contradicts {Path(source) / 'config.json'} "
                          f"({'; '.join(contradictions)}); leave these keys out to take the checkpoint's values")
    for field, why in CHANGEABLE.items():
        value = getattr(theirs, field)
        if getattr(mine, field) == value:
            continue
        if _explicit(cfg, field):
            print(f"apogee: note: model.{field}={getattr(mine, field)!r} here, {value!r} in {source}/config.json "
                  f"(allowed: {why})", file=sys.stderr)
        else:
            setattr(mine, field, value)
    context = mine.max_position_embeddings or mine.seq_length
    if mine.seq_length > context and mine.rope_scaling == theirs.rope_scaling:
        print(f"apogee: note: model.seq_length={mine.seq_length} is beyond the checkpoint's context "
              f"({context} tokens, max_position_embeddings) with its RoPE unchanged", file=sys.stderr)
    tokenizer = Path(source) / "tokenizer.json"
    if "data.tokenizer" not in cfg.explicit and tokenizer.is_file():
        cfg.data.tokenizer = str(Path(source))
    print(f"apogee: the model is {source}'s ({describe(mine)}; tokenizer {cfg.data.tokenizer})")


def describe(m: ModelConfig) -> str:
    """A one-line summary of a model's architecture for messages."""
    parts = [f"{m.num_layers} layers", f"hidden {m.hidden_size}", f"{m.num_heads} heads / {m.num_kv_heads} kv",
             f"vocab {m.vocab_size}", f"rms_norm_eps {m.norm_eps:g}", f"rope_theta {m.rope_base:g}"]
    if m.num_experts:
        parts.insert(2, f"{m.num_experts} experts (top {m.moe_topk}) of width {m.moe_ffn_hidden_size or m.ffn_hidden_size}")
    else:
        parts.insert(2, f"ffn {m.ffn_hidden_size}")
    if m.rope_scaling:
        parts.append(f"llama3 rope scaling x{m.rope_scaling['factor']:g}")
    parts.append("tied embeddings" if m.tie_embeddings else "untied embeddings")
    return ", ".join(parts)


def check_init_source(cfg: ApogeeConfig) -> None:
    """Refuse (ConfigError) an init_from that does not exist or holds another model shape."""
    kind, path = resolve_source(cfg.train.init_from)
    if kind == "apogee":
        read_metadata(path)  # UnsafeCheckpointError (exit 2) for a metadata file that would run code
    if cfg.parallel.zero == 3:
        raise ConfigError("train.init_from with parallel.zero=3: loading weights into ZeRO-3 shards is not "
                          "implemented; use zero 0-2 for the first run, or resume instead")
    source_model = _source_model(kind, path, cfg.train.init_from)
    if kind == "hf":
        source, mine = architecture(source_model), architecture(cfg.model)
    else:
        source, mine = ({k: getattr(m, k) for k in SHAPE_FIELDS} for m in (source_model, cfg.model))
    differ = [f"{k}: {source[k]} there, {mine.get(k)} here" for k in source if source[k] != mine.get(k)]
    if differ:
        raise ConfigError(f"train.init_from={cfg.train.init_from!r} holds another model ({'; '.join(differ)})")


@torch.no_grad()
def initialize_chunks(chunks: list, source: str, tie_embeddings: bool, world_size: int) -> str:
    """Load the weights of `source` into model `chunks` (every rank calls it); returns the source kind."""
    kind, path = resolve_source(source, hashes=False)  # verified before the ranks started
    named = [item for chunk in chunks for item in chunk.named_parameters()]
    if kind == "apogee":
        # every rank reads its own shards; the optimizer state is left out
        safe_load(model_views(named, tie_embeddings), path, no_dist=world_size == 1)
    else:
        from engine.model.hf_interop import VOCAB_TENSORS
        from engine.model.hf_slices import HFSliceReader

        reader = HFSliceReader(path)  # every rank reads only its tensor- or expert-parallel slices
        for name, param in named:
            if name.endswith(("lora_A", "lora_B")):
                continue  # adapters keep their initial values (B = 0)
            key = "embed_tokens.weight" if tie_embeddings and name == "lm_head.weight" else name
            shard = shard_of(param)
            if key in VOCAB_TENSORS:  # the HF rows, then this run's padding rows (model.make_vocab_size_divisible_by)
                param.copy_(reader.read_rows(key, _global_shape(param), shard))
                continue
            if reader.global_shape(key) != _global_shape(param):
                raise CheckpointError(f"train.init_from={source!r}: {key} has shape {reader.global_shape(key)} "
                                      f"there, {_global_shape(param)} here")
            param.copy_(reader.read(key, shard))
    return f"{kind} weights"


def _global_shape(param) -> list[int]:
    shape, shard = list(param.shape), shard_of(param)
    if shard is not None:
        shape[shard[0]] *= shard[2]
    return shape


def initialize_from(trainer, source: str) -> str:
    """Load the weights of `source` into `trainer`'s model and restart its optimizer's fp32 masters
    from them (every rank calls it); returns the source kind."""
    kind = initialize_chunks(trainer.chunks, source, trainer.cfg.model.tie_embeddings, trainer.ctx.world_size)
    sync_masters(trainer.optimizer)
    return kind

"""Starting a run from another run's weights: an Apogee checkpoint of any layout, or a Hugging
Face Llama directory (fine-tuning, and any stage that continues a pre-trained model).

Only the weights travel: the optimizer starts fresh (its fp32 masters are re-read from the
loaded weights; for a bf16 run those are the bf16 values), the step count, the data position and
the RNG start at zero. An Apogee checkpoint is read through DCP into this rank's shards, so the
source and the new run may have different layouts; a Hugging Face directory is read whole and
each rank copies its slice. `check_init_source` validates the source against the run's model
before any rank starts, verifying its checksums and reading its DCP metadata through the restricted
unpickler (engine/state/safe_load.py); the ranks then load it without unpickling anything else.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from engine.state.checkpoint_store import CheckpointError, read_manifest, resolve_checkpoint
from engine.state.safe_load import read_metadata, safe_load
from engine.state.views import model_views, sync_masters
from engine.config import ApogeeConfig, ConfigError, ModelConfig
from parallel.sharding import shard_of

SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "qk_norm", "tie_embeddings", "num_experts", "moe_ffn_hidden_size")
"""Model fields that must agree between the source of the weights and the run (not seq_length,
RoPE or the loss settings, which a later stage may change)."""


def resolve_source(source: str, hashes: bool = True) -> tuple[str, Path]:
    """('hf' | 'apogee', directory) of an init_from path; a checkpoints/ directory means its newest
    intact one (hashes=False: manifest and sizes only, for ranks after the launcher verified it)."""
    path = Path(source)
    if (path / "config.json").is_file():
        return "hf", path
    try:
        return "apogee", resolve_checkpoint(source, "train.init_from", hashes=hashes)
    except CheckpointError as error:
        raise ConfigError(f"train.init_from={source!r}: not a Hugging Face Llama directory (config.json) nor an "
                          f"intact Apogee checkpoint ({error.reason})") from None


def _source_model(kind: str, path: Path) -> ModelConfig:
    if kind == "hf":
        import json

        from engine.model.hf_interop import model_config_from_hf
        return model_config_from_hf(json.loads((path / "config.json").read_text()))
    return ModelConfig(**read_manifest(path)["metadata"]["model"])


def check_init_source(cfg: ApogeeConfig) -> None:
    """Refuse (ConfigError) an init_from that does not exist or holds another model shape."""
    kind, path = resolve_source(cfg.train.init_from)
    if kind == "apogee":
        read_metadata(path)  # UnsafeCheckpointError (exit 2) for a metadata file that would run code
    if cfg.parallel.zero == 3:
        raise ConfigError("train.init_from with parallel.zero=3: loading weights into ZeRO-3 shards is not "
                          "implemented; use zero 0-2 for the first run, or resume instead")
    source = dataclasses.asdict(_source_model(kind, path))
    mine = dataclasses.asdict(cfg.model)
    differ = [f"{k}: {source[k]} there, {mine[k]} here" for k in SHAPE_FIELDS if source[k] != mine[k]]
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
        from engine.model.hf_interop import load_hf

        _, full = load_hf(path)
        for name, param in named:
            if name not in full and name.endswith(("lora_A", "lora_B")):
                continue  # adapters keep their initial values (B = 0)
            value = full["embed_tokens.weight" if tie_embeddings and name == "lm_head.weight" else name]
            shard = shard_of(param)
            if shard is not None:
                dim, rank, world = shard
                value = value.chunk(world, dim=dim)[rank]
            param.copy_(value)
    return f"{kind} weights"


def initialize_from(trainer, source: str) -> str:
    """Load the weights of `source` into `trainer`'s model and restart its optimizer's fp32 masters
    from them (every rank calls it); returns the source kind."""
    kind = initialize_chunks(trainer.chunks, source, trainer.cfg.model.tie_embeddings, trainer.ctx.world_size)
    sync_masters(trainer.optimizer)
    return kind

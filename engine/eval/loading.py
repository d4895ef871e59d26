"""A checkpoint to sample from or evaluate: an Apogee checkpoint of any layout, or a Hugging Face
Llama directory, as this rank's (tensor-parallel) model and the tokenizer it was trained with.

`--checkpoint` names a step_* directory, a run's checkpoints/ folder or run directory (its newest
intact checkpoint: engine/state/checkpoint_store.resolve_checkpoint), or a directory with a
config.json (Hugging Face). The tokenizer is `--tokenizer` when given, else the run's
(`data.tokenizer` in the run directory's config.yaml), a Hugging Face directory's tokenizer.json,
or the byte tokenizer. The whole model is read in one process (engine/state/export.load_model
folds LoRA adapters in); at tp > 1 each rank keeps its slice of every weight, in a model built
and parallelised like the trainer's (engine/model/parallelize.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import yaml

from engine.config import ApogeeConfig, ModelConfig
from engine.model.decoder import LlamaModel
from engine.state.checkpoint_store import CheckpointError, read_manifest, recorded_model, resolve_checkpoint
from parallel.layout import ParallelLayout
from parallel.sharding import shard_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Inference dtypes by name."""


class ModelSource(NamedTuple):
    """Where a model comes from and what it is."""

    kind: str
    """'apogee' or 'hf'."""
    path: Path
    """The checkpoint directory (step_*) or the Hugging Face directory."""
    model: ModelConfig
    """Its shape."""
    tokenizer: str
    """'byte' or the path of a tokenizer.json."""
    run_dir: Optional[Path]
    """The run directory that wrote it (metrics.jsonl, config.yaml), when known."""
    step: Optional[int]
    """The optimizer step it holds (Apogee checkpoints)."""


def find_run_dir(checkpoint: Path) -> Optional[Path]:
    """The run directory of a checkpoint (RUN/checkpoints/step_N): the nearest parent with a config.yaml."""
    for parent in list(checkpoint.parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def resolve_model_source(path: str, key: str = "--checkpoint", tokenizer: Optional[str] = None) -> ModelSource:
    """The model `path` names; CheckpointError naming `key` and the path when it is none."""
    directory = Path(path)
    if (directory / "config.json").is_file():
        from engine.model.hf_interop import model_config_from_hf

        try:
            cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{key}={path!r}: {directory / 'config.json'} is not a Llama config ({error})") from None
        own = directory / "tokenizer.json"
        return ModelSource("hf", directory, cfg, tokenizer or (str(own) if own.is_file() else "byte"), None, None)
    checkpoint = resolve_checkpoint(path, key)
    manifest = read_manifest(checkpoint)
    run_dir = find_run_dir(checkpoint)
    if tokenizer is None:
        tokenizer = manifest["metadata"].get("tokenizer") or "byte"  # recorded since the HF export work
        if run_dir is not None and "tokenizer" not in manifest["metadata"]:
            run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            tokenizer = (run_config.get("data") or {}).get("tokenizer", "byte")
    return ModelSource("apogee", checkpoint, ModelConfig(**recorded_model(manifest["metadata"]["model"])), tokenizer, run_dir,
                       int(manifest["step"]))


def load_full_model(source: ModelSource) -> LlamaModel:
    """The whole model of `source` in fp32 on CPU."""
    if source.kind == "apogee":
        from engine.state.export import load_model

        return load_model(source.path)
    from engine.model.hf_interop import load_hf

    cfg, state = load_hf(source.path)
    model = LlamaModel(cfg)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def build_inference_model(source: ModelSource, ctx, dtype: torch.dtype = torch.float32, ledger=None) -> LlamaModel:
    """This rank's model of `source` for generation or evaluation (eval mode, no gradients): the whole
    model at tp = 1, else its tensor-parallel slice over ctx's TP group (sequence parallelism off)."""
    full = load_full_model(source)
    tp = ctx.size("tp")
    if tp == 1:
        model = full
    else:
        from engine.model.parallelize import parallelize_model
        from parallel.collectives import CommLedger

        cfg = ApogeeConfig(model=source.model, parallel=ParallelLayout(tp=tp, dp=ctx.size("dp")))
        model = parallelize_model(LlamaModel(source.model), cfg, ctx, ledger or CommLedger())
        weights = full.state_dict()
        for name, param in model.named_parameters():
            value = weights[name]
            shard = shard_of(param)
            if shard is not None:
                dim, rank, world = shard
                value = value.chunk(world, dim=dim)[rank]
            param.copy_(value)
    model = model.to(device=ctx.device, dtype=dtype).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_tokenizer(tokenizer, source: ModelSource, key: str = "--tokenizer") -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (CheckpointError naming both)."""
    if tokenizer.vocab_size > source.model.vocab_size:
        raise CheckpointError(f"{key}={source.tokenizer!r}: {tokenizer.vocab_size} token ids, more than the model's "
                              f"vocab_size={source.model.vocab_size} ({source.path}); use the tokenizer it was trained with")

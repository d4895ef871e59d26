"""`apogee export --checkpoint DIR --to hf --out DIR`: a checkpoint of any layout -> a complete
Hugging Face directory (Llama, or Mixtral for a MoE model).

The checkpoint's model tensors are saved under global names and shapes, so one process loads them
into a whole single-rank model whatever layout wrote them (LoRA adapters folded in); hf_interop
writes the weights (safetensors shards with their index, in the chosen dtype) and config.json.
The tokenizer the run trained with (recorded in the checkpoint's manifest) is written beside
them (data_pipeline/tokenizer_files.py), and generation_config.json names its BOS, EOS and pad.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from engine.state.checkpoint_store import CheckpointError, read_manifest, recorded_model, resolve_checkpoint
from engine.state.safe_load import safe_load
from engine.state.views import model_views
from engine.config import ModelConfig
from engine.model.lora import TARGETS, apply_lora, merge_lora
from engine.model.decoder import LlamaModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--dtype choices of the exported weights."""


def tokenizer_source(name: str) -> str:
    """The tokenizer a checkpoint records: 'byte', or the absolute path of a tokenizer file or directory
    (so an export from another directory finds it)."""
    return name if name == "byte" else os.path.abspath(name)


def load_model(checkpoint: str | Path) -> LlamaModel:
    """The whole model (fp32, one process) held by a checkpoint of any layout: a step_* directory,
    or a run's checkpoints/ folder (its newest intact one). Nothing in it is unpickled but DCP's
    metadata types (a crafted file is refused with UnsafeCheckpointError)."""
    path = resolve_checkpoint(checkpoint, "--checkpoint")
    metadata = read_manifest(path)["metadata"]
    try:
        cfg = ModelConfig(**recorded_model(metadata["model"]))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"--checkpoint {checkpoint}: manifest.json holds no usable model config ({err})") from None
    model = LlamaModel(cfg)
    lora = metadata.get("lora")
    if lora:  # read the adapters too, then fold them into the weights
        apply_lora(model, lora["rank"], lora["alpha"], tuple(lora.get("targets", TARGETS)))
    safe_load(model_views(model.named_parameters(), cfg.tie_embeddings), path, no_dist=True)  # never unpickles code
    if lora:
        merged = merge_lora(model.state_dict(), lora["alpha"] / lora["rank"])
        model = LlamaModel(cfg)
        model.load_state_dict(merged)
    return model


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: Optional[str] = None,
              tokenizer: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> LlamaModel:
    """Write checkpoint `checkpoint` as a Hugging Face directory `out_dir`; returns the model.

    dtype: fp32, bf16 or fp16 (default: bf16 for a bf16 or fp8 run, else fp32); tokenizer:
    overrides the one the checkpoint records (checkpoints written before it was recorded need it
    for the tokenizer files; without one, only weights and config are written).
    """
    from data_pipeline.tokenizer_files import write_tokenizer_files
    from engine.model.hf_interop import DEFAULT_SHARD_BYTES, save_hf

    path = resolve_checkpoint(checkpoint, "--checkpoint")  # verified; a checkpoints/ folder is its newest intact one
    model = load_model(path)
    metadata = read_manifest(path)["metadata"]
    if dtype is None:
        dtype = "bf16" if metadata.get("precision") in ("bf16", "fp8") else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = tokenizer or metadata.get("tokenizer")
    if source:
        from data_pipeline.tokenizer import get_tokenizer

        ids = get_tokenizer(source).vocab_size
        if ids > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {source}: {ids} ids, more than the model's {model.cfg.vocab_size} embedding rows "
                             f"(model.vocab_size); pass the tokenizer the run trained with (--tokenizer)")
    tokens = write_tokenizer_files(source, out_dir) if source else {}
    save_hf(model, model.cfg, out_dir, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
            tokens=tokens)
    if not source:
        print(f"apogee: note: {checkpoint} records no tokenizer (written before Apogee recorded it); pass "
              f"--tokenizer to ship one", file=sys.stderr)
        return model
    generation = {k: v for k, v in tokens.items() if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return model

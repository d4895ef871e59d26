"""`apogee export --checkpoint DIR --to hf --out DIR`: a checkpoint of any layout -> Hugging Face Llama.

The checkpoint's model tensors are saved under global names and shapes, so one process loads them
into a whole single-rank model whatever layout wrote them; hf_interop then writes the HF layout.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp

from engine.state.checkpoint import model_views, single_process_quietly
from engine.state.checkpoint_store import CheckpointError, read_manifest, verify
from engine.config import ModelConfig
from engine.model.lora import TARGETS, apply_lora, merge_lora
from engine.model.decoder import LlamaModel


def load_model(checkpoint: str | Path) -> LlamaModel:
    """The whole model (fp32, one process) held by a checkpoint directory of any layout."""
    path = Path(checkpoint)
    problem = verify(path) if path.is_dir() else "no such directory"
    if problem is not None:
        raise CheckpointError(f"--checkpoint {checkpoint}: {problem}")
    metadata = read_manifest(path)["metadata"]
    cfg = ModelConfig(**metadata["model"])
    model = LlamaModel(cfg)
    lora = metadata.get("lora")
    if lora:  # read the adapters too, then fold them into the weights
        apply_lora(model, lora["rank"], lora["alpha"], tuple(lora.get("targets", TARGETS)))
    views = model_views(model.named_parameters(), cfg.tie_embeddings)
    with single_process_quietly():
        dcp.load(views, checkpoint_id=str(path), no_dist=True, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    if lora:
        merged = merge_lora(model.state_dict(), lora["alpha"] / lora["rank"])
        model = LlamaModel(cfg)
        model.load_state_dict(merged)
    return model

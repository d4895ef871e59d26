"""`apogee export --checkpoint DIR --to hf --out DIR`: a checkpoint of any layout -> Hugging Face Llama.

The checkpoint's model tensors are saved under global names and shapes, so one process loads them
into a whole single-rank model whatever layout wrote them; hf_interop then writes the HF layout.
"""
from __future__ import annotations

from pathlib import Path

from engine.state.checkpoint_store import CheckpointError, read_manifest, resolve_checkpoint
from engine.state.safe_load import safe_load
from engine.state.views import model_views
from engine.config import ModelConfig
from engine.model.lora import TARGETS, apply_lora, merge_lora
from engine.model.decoder import LlamaModel


def load_model(checkpoint: str | Path) -> LlamaModel:
    """The whole model (fp32, one process) held by a checkpoint of any layout: a step_* directory,
    or a run's checkpoints/ folder (its newest intact one). Nothing in it is unpickled but DCP's
    metadata types (a crafted file is refused with UnsafeCheckpointError)."""
    path = resolve_checkpoint(checkpoint, "--checkpoint")
    metadata = read_manifest(path)["metadata"]
    try:
        cfg = ModelConfig(**metadata["model"])
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

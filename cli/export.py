"""`apogee export --checkpoint DIR --to hf --out DIR`: a checkpoint of any layout -> Hugging Face Llama."""
from __future__ import annotations

import argparse
import sys

from engine.model.hf_interop import save_hf
from engine.state.checkpoint_store import CheckpointError, resolve_checkpoint
from engine.state.export import load_model


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee export`."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint (runs/NAME/checkpoints/step_...) or a run's checkpoints/ folder (its newest intact one)")
    parser.add_argument("--to", choices=["hf"], default="hf", help="target format (hf: Hugging Face Llama)")
    parser.add_argument("--out", required=True, help="output directory")


def run_cli(args: argparse.Namespace) -> int:
    """Export; a bad checkpoint exits 2 with the reason."""
    try:
        model = load_model(resolve_checkpoint(args.checkpoint, "--checkpoint"))
        save_hf(model, model.cfg, args.out)
        save_tokenizer(args.checkpoint, args.out)
    except (CheckpointError, ValueError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
    print(f"apogee: exported {args.checkpoint} -> {args.out} (Hugging Face Llama, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def save_tokenizer(checkpoint: str, out: str) -> None:
    """Put the run's tokenizer next to the exported weights (transformers' AutoTokenizer and
    lm-evaluation-harness read it): the byte tokenizer as HF files, or the run's tokenizer.json."""
    import shutil
    from pathlib import Path

    from data_pipeline.hf_byte_tokenizer import save_byte_tokenizer
    from engine.eval.loading import resolve_model_source

    tokenizer = resolve_model_source(checkpoint, "--checkpoint").tokenizer
    if tokenizer == "byte":
        save_byte_tokenizer(out)
    elif Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, Path(out) / "tokenizer.json")

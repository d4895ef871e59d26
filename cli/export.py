"""`apogee export --checkpoint DIR --to hf --out DIR`: a checkpoint of any layout -> a Hugging Face directory."""
from __future__ import annotations

import argparse
import sys

from data_pipeline import DataError
from engine.state.checkpoint_store import CheckpointError
from engine.state.export import DTYPES, export_hf


def _size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a byte count -> bytes."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10}
    upper = text.strip().upper()
    try:
        for unit, scale in units.items():
            if upper.endswith(unit):
                return int(float(upper[:-2]) * scale)
        return int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 1000000") from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee export`."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint (runs/NAME/checkpoints/step_...) or a run's checkpoints/ folder (its newest intact one)")
    parser.add_argument("--to", choices=["hf"], default="hf", help="target format (hf: Hugging Face Llama, or Mixtral for a MoE model)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the exported weights (default: bf16 for a bf16 or fp8 run, else fp32)")
    parser.add_argument("--tokenizer", default=None,
                        help="the tokenizer to ship (default: the one the run trained with, recorded in the checkpoint)")
    parser.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                        help="largest safetensors file (default 5GB, as transformers)")


def run_cli(args: argparse.Namespace) -> int:
    """Export; a bad checkpoint, tokenizer or model exits 2 with the reason."""
    try:
        model = export_hf(args.checkpoint, args.out, args.dtype, args.tokenizer, args.max_shard_size)
    except (CheckpointError, DataError, ValueError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
    kind = "Mixtral" if model.cfg.num_experts else "Llama"
    print(f"apogee: exported {args.checkpoint} -> {args.out} (Hugging Face {kind}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


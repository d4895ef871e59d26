"""`apogee preprocess`: text, JSON lines and directories -> a Megatron PREFIX.bin/.idx (data_pipeline/preprocess.py)."""
from __future__ import annotations

import argparse
import sys

from data_pipeline import DataError
from data_pipeline.named_inputs import NAMED_INPUTS
from data_pipeline.indexed_dataset import TOKEN_DTYPES
from data_pipeline.preprocess import preprocess


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `apogee preprocess` options on `parser`."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=f"text, .jsonl(.gz/.zst), .parquet or .arrow files, `datasets` save_to_disk directories, "
                        f"directories (recursive) or a named input: {', '.join(sorted(NAMED_INPUTS))}")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (default), the path of a tokenizer.json, or a directory holding one")
    parser.add_argument("--json-key", default="text",
                        help="key (JSONL) or column (Parquet, Arrow) holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--dtype", default=None, choices=sorted(TOKEN_DTYPES),
                        help="token dtype (default: uint16 if vocab < 65500 else int32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """Run `apogee preprocess` from parsed arguments; a DataError prints 'error: ...' and returns 2."""
    try:
        preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer, json_key=args.json_key,
                   workers=args.workers, progress=not args.no_progress, dtype=args.dtype)
    except DataError as error:
        print(f"apogee preprocess: error: {error}", file=sys.stderr)
        return 2
    return 0


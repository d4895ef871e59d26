"""`apogee eval --checkpoint DIR [DIR ...] --data PATH | --tasks FILE.jsonl`: checkpoints side by side
(engine/eval/evaluate.py, engine/eval/report.py). With --json only JSON goes to standard output."""
from __future__ import annotations

import argparse
import json
import sys

from cli.generate import CHECKPOINT_HELP, add_model_arguments, add_sampling_arguments, sampling_request


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee eval`."""
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="DIR",
                        help=f"one or more checkpoints, compared side by side: each {CHECKPOINT_HELP}")
    parser.add_argument("--data", nargs="+", default=[], metavar="PATH",
                        help="held-out data for loss, perplexity and (byte tokenizer) bits per byte: a dataset PREFIX "
                             "(.bin/.idx) or text/.jsonl(.gz/.zst)/.parquet files, tokenized with each checkpoint's "
                             "tokenizer")
    parser.add_argument("--json-key", default="text", help="text field of JSONL --data inputs (default text)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="evaluate the first N tokens of each --data input (default: all)")
    parser.add_argument("--seq-length", type=int, default=None, metavar="S",
                        help="context of the --data windows (default: each model's seq_length; set it to compare "
                             "models trained with different ones)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="windows of seq_length + 1 tokens per forward pass over --data (default 8)")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="FILE.jsonl",
                        help='tasks with checkable answers, one per line: {"prompt": TEXT, "answer": TEXT} '
                             '(or {"messages": [...], "answer": TEXT}): accuracy, reward mean, pass@k')
    parser.add_argument("--reward", default="exact_match",
                        help="scores a completion against its answer: exact_match, contains, or package.module:function "
                             "taking (completion, answer) -> float (default exact_match; 1 counts as correct)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="K",
                        help="completions per task prompt (default 1; use --temperature > 0 with K > 1)")
    parser.add_argument("--pass-k", type=int, nargs="+", default=None, metavar="K",
                        help="report pass@K for each K <= --num-samples (default: 1, and --num-samples when > 1)")
    add_sampling_arguments(parser, max_new_tokens=32)
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON array, one object per checkpoint: checkpoint, step, loss, ppl, "
                             "bits_per_byte, tokens, accuracy, reward_mean, pass@K, tasks (as they apply)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="draw the checkpoints' validation-loss curves (val_loss of each run directory's "
                             "metrics.jsonl; the training loss, dashed, where a run has none) into FILE.png")


def eval_request(args: argparse.Namespace):
    """The EvalRequest of the parsed options; ValueError naming a bad option."""
    from engine.eval.evaluate import EvalRequest
    from engine.rewards import reward_function

    if not args.data and not args.tasks and not args.plot:
        raise ValueError("nothing to evaluate: give --data PATH, --tasks FILE.jsonl and/or --plot FILE.png")
    sampling = sampling_request(args, args.num_samples)
    pass_k = args.pass_k if args.pass_k is not None else sorted({1, args.num_samples})
    for k in pass_k:
        if not 1 <= k <= args.num_samples:
            raise ValueError(f"--pass-k {k}: must be in 1..--num-samples={args.num_samples}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens {args.max_tokens}: must be >= 2")
    if args.seq_length is not None and args.seq_length < 1:
        raise ValueError(f"--seq-length {args.seq_length}: must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        reward_function(args.reward)
    except ValueError as error:
        raise ValueError(f"--reward {args.reward!r}: {error}") from None
    return EvalRequest(data=list(args.data), tasks=list(args.tasks), json_key=args.json_key, max_tokens=args.max_tokens,
                       batch_size=args.batch_size, seq_length=args.seq_length, reward=args.reward, pass_k=pass_k if args.tasks else [],
                       chat=args.chat, sampling=sampling)


def run_cli(args: argparse.Namespace) -> int:
    """Evaluate every checkpoint and print the table (or JSON); bad inputs exit 2 with file and line."""
    from data_pipeline import DataError
    from data_pipeline.tokenizer import get_tokenizer
    from engine.eval.evaluate import evaluate_all
    from engine.eval.loading import check_tokenizer, resolve_model_source
    from engine.eval.report import format_table, plot_curves
    from engine.state.checkpoint_store import CheckpointError

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        request = eval_request(args)
        sources = [resolve_model_source(path, "--checkpoint", args.tokenizer) for path in args.checkpoint]
        tokenizers = [get_tokenizer(source.tokenizer) for source in sources]
        for source, tokenizer in zip(sources, tokenizers):
            check_tokenizer(tokenizer, source)
        if args.plot:
            import matplotlib  # noqa: F401 (checked before any model runs)
        rows = evaluate_all(sources, tokenizers, request, log) if (request.data or request.tasks) else \
            [{"checkpoint": str(s.path), "step": s.step} for s in sources]
    except ImportError as error:
        print(f"apogee: error: --plot {args.plot}: needs matplotlib ({error}); pip install matplotlib", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError, DataError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        plot_curves([s.run_dir for s in sources], list(args.checkpoint), args.plot, log)
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, list(args.checkpoint)))
    return 0

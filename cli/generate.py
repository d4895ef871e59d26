"""`apogee generate --checkpoint DIR --prompt TEXT | --prompts FILE.jsonl`: sample from a checkpoint
(engine/eval/sample_job.py). With --json only JSON goes to standard output; logs go to stderr."""
from __future__ import annotations

import argparse
import json
import sys

CHECKPOINT_HELP = ("an Apogee checkpoint of any layout (a step_* directory, or a run's checkpoints/ folder or run "
                   "directory: its newest intact one) or a Hugging Face Llama directory (config.json + safetensors)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--tokenizer and --dtype, shared with `apogee eval`."""
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a tokenizer.json (default: the run's data.tokenizer, an HF directory's "
                             "tokenizer.json, else byte)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="inference precision (default fp32)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """The decoding options, shared with `apogee eval --tasks`."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"most tokens generated per completion (default {max_new_tokens}); prompt + N must fit "
                             f"the model's seq_length")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="softmax temperature; 0 decodes greedily (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling: sample among the smallest set of tokens whose probability reaches P "
                             "(default 1: all)")
    parser.add_argument("--seed", type=int, default=1234, metavar="S",
                        help="seed of the sampling (completion c of prompt p draws from (S, p, c); default 1234)")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop string (repeatable): a completion ends once its text contains it; the text is "
                             "cut before it")
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user message with the tokenizer's chat template (without one: "
                             "'user: TEXT\\nassistant: ', the format SFT trains on); {messages} lines always are")
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the whole sequence for each new token instead of using the KV cache (slower; "
                             "for checking)")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `apogee generate`."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument("--prompts", metavar="FILE.jsonl",
                        help='prompts, one JSON object per line: {"prompt": TEXT} or {"messages": [{role, content}]}')
    add_sampling_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=1, metavar="K", help="completions per prompt (default 1)")
    add_model_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="tensor-parallel ranks to sample on (default 1; N must divide the heads, kv heads, "
                             "ffn width and vocabulary)")
    parser.add_argument("--json", action="store_true",
                        help="print only JSON: {prompt, prompt_ids, completion_ids, text, finish_reason[, samples]} "
                             "for --prompt, an array of them for --prompts")


def sampling_request(args: argparse.Namespace, num_samples: int = 1):
    """The SamplingRequest of the parsed options; ValueError naming an option with a bad value."""
    from engine.eval.sample_job import SamplingRequest

    checks = [(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, "must be >= 1"),
              (args.temperature >= 0, "--temperature", args.temperature, "must be >= 0 (0: greedy)"),
              (0 < args.top_p <= 1, "--top-p", args.top_p, "must be in (0, 1]"),
              (num_samples >= 1, "--num-samples", num_samples, "must be >= 1")]
    for ok, option, value, valid in checks:
        if not ok:
            raise ValueError(f"{option} {value}: {valid}")
    return SamplingRequest(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, num_samples=num_samples, stop=list(args.stop),
                           use_cache=not args.no_cache, dtype=args.dtype)


def check_tensor_parallel(model, nproc: int) -> None:
    """Refuse an --nproc that does not divide the model's sharded dimensions (ValueError)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    sizes = {"num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads,
             "ffn_hidden_size": model.ffn_hidden_size, "vocab_size": model.vocab_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % nproc]
    if bad or (nproc > 1 and model.num_experts):
        why = f"{', '.join(bad)} not divisible by it" if bad else "MoE models sample on one rank"
        raise ValueError(f"--nproc {nproc}: tensor parallelism over {nproc} ranks needs the model's heads, kv heads, "
                         f"ffn width and vocabulary divisible by it ({why})")


def load_source(args: argparse.Namespace):
    """(ModelSource, tokenizer) of --checkpoint / --tokenizer; CheckpointError or DataError when unusable."""
    from data_pipeline.tokenizer import get_tokenizer
    from engine.eval.loading import check_tokenizer, resolve_model_source

    source = resolve_model_source(args.checkpoint, "--checkpoint", args.tokenizer)
    tokenizer = get_tokenizer(source.tokenizer)
    check_tokenizer(tokenizer, source)
    return source, tokenizer


def run_cli(args: argparse.Namespace) -> int:
    """Sample and print; a bad option, checkpoint or prompt line exits 2 with the reason."""
    from data_pipeline import DataError
    from engine.eval.prompts import check_lengths, encode_prompt, read_prompt_file
    from engine.eval.sample_job import run_generation
    from engine.state.checkpoint_store import CheckpointError

    try:
        request = sampling_request(args, args.num_samples)
        source, tokenizer = load_source(args)
        check_tensor_parallel(source.model, args.nproc)
        if args.prompts is not None:
            items = read_prompt_file(args.prompts, tokenizer, args.chat)
        else:
            items = [encode_prompt({"prompt": args.prompt}, tokenizer, args.chat, "--prompt")]
        check_lengths(items, request.max_new_tokens, source.model.seq_length)
    except (ValueError, CheckpointError, DataError) as err:
        print(f"apogee: error: {err}", file=sys.stderr)
        return 2
    print(f"apogee: sampling {len(items)} prompt(s) x {request.num_samples} from {source.path} ({source.kind}, "
          f"tokenizer {source.tokenizer}, {args.nproc} rank(s), {'KV cache' if request.use_cache else 'no cache'})",
          file=sys.stderr, flush=True)
    records = run_generation(source, items, request, args.nproc)
    if args.json:
        print(json.dumps(records if args.prompts is not None else records[0]))
        return 0
    several = len(records) > 1 or request.num_samples > 1
    for index, record in enumerate(records):
        for sample, run in enumerate(record.get("samples", [record])):
            if several:
                print(f"--- prompt {index + 1}, sample {sample + 1} ({run['finish_reason']}) ---")
            print(record["prompt"] + run["text"])
    return 0

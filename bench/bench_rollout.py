"""GRPO rollout time before and after the KV-cache generator, side by side on one trainer.

before: the rollout loop GRPO had (stages/grpo/trainer.py before engine/eval/generate.py): every
        new token re-runs the whole fixed-length [rows, seq] batch of all the microbatch's prompts;
after:  GRPOTrainer.rollout, engine/eval/generate.py's Generator: each prompt's group prefilled
        once, then one position per token against the KV cache.
Both sample with the same per-(step, prompt, completion) generators, so the tokens are compared too.

    python bench/bench_rollout.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def rollout_before(trainer, step: int, prompts) -> torch.Tensor:
    """The token rows of GRPO's rollout as it was: full re-run of [rows, seq] for each new token."""
    from engine.eval.generate import sample_tokens
    from parallel.collectives import all_gather_along
    from parallel.random import generator

    g, seq, eod = trainer.cfg.grpo, trainer.cfg.model.seq_length, trainer.tokenizer.eod_id
    vocab = min(trainer.tokenizer.vocab_size, trainer.cfg.model.vocab_size)
    rows = len(prompts) * g.group_size
    tokens = torch.full((rows, seq + 1), trainer.tokenizer.pad_id, dtype=torch.int64)
    starts = torch.tensor([len(p.tokens) for p in prompts for _ in range(g.group_size)])
    generators = []
    for i, prompt in enumerate(prompts):
        tokens[i * g.group_size:(i + 1) * g.group_size, :len(prompt.tokens)] = torch.tensor(prompt.tokens)
        generators += [generator(trainer.cfg.seed, "grpo-rollout", step, prompt.position, c) for c in range(g.group_size)]
    ends, active = starts.clone(), torch.ones(rows, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(g.max_new_tokens):
            if not active.any():
                break
            logits = trainer.model(tokens[:, :seq], positions=trainer.positions)
            rows_now = active.nonzero().squeeze(1)
            last = logits[rows_now, ends[rows_now] - 1]
            last = all_gather_along(last, -1, trainer.tp, purpose="grpo_sampling")[:, :vocab]
            chosen = sample_tokens(last, g.temperature, [generators[r] for r in rows_now.tolist()]).cpu()
            tokens[rows_now, ends[rows_now]] = chosen
            ends[rows_now] += 1
            active[rows_now] = chosen != eod
    return tokens


def main() -> None:
    """Time both rollouts of the same step's prompts and print them with their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch and fewer tokens")
    args = parser.parse_args()
    from data_pipeline.prompts import PromptData
    from data_pipeline.tokenizer import ByteTokenizer
    from engine.config_validation import validate
    from parallel.topology import ParallelContext
    from stages.grpo.trainer import GRPOTrainer
    from stages.registry import builtin_stages

    group, new, prompts_per_batch = (4, 8, 2) if args.quick else (8, 32, 4)
    registry = builtin_stages()
    stage = registry.get("grpo")
    cfg = validate(registry.load_config(stage, ROOT / "configs" / "tiny.yaml", [
        "grpo.inputs=[unused]", f"grpo.group_size={group}", f"grpo.max_new_tokens={new}", "grpo.reward=contains",
        f"train.micro_batch_size={prompts_per_batch}", f"train.global_batch_size={prompts_per_batch}",
        "logging.tensorboard=false"]), 1)
    tokenizer = ByteTokenizer()
    texts = ["def add(a, b):", "import os\n", "class Stack:", "for i in range(", "# compute the", "return x +"]
    data = PromptData([(tuple(tokenizer.encode(t)), "x") for t in texts], cfg.seed, cfg.train.global_batch_size,
                      cfg.train.micro_batch_size)
    trainer = GRPOTrainer(cfg, ParallelContext.single(), data)
    prompts = data.microbatch(0, 0, 0, 1)
    timings = {}
    for name, fn in (("before", lambda: rollout_before(trainer, 0, prompts)), ("after", lambda: trainer.rollout(0, prompts).tokens)):
        fn()  # warm up
        start = time.perf_counter()
        tokens = fn()
        timings[name] = (time.perf_counter() - start, tokens)
    same = torch.equal(timings["before"][1], timings["after"][1])
    rows = len(prompts) * group
    print(f"GRPO rollout of {len(prompts)} prompts x {group} completions, up to {new} new tokens, "
          f"model h={cfg.model.hidden_size} L={cfg.model.num_layers} seq={cfg.model.seq_length}:")
    for name in ("before", "after"):
        print(f"  {name:>6}: {timings[name][0] * 1000:8.1f} ms  ({rows} rows)")
    print(f"  ratio before/after: {timings['before'][0] / timings['after'][0]:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()

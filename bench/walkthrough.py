"""The README's walkthrough of the three-stage rocket, end to end: pretrain the tiny model, branch its
WSD cooldown (midtrain), SFT it on the arithmetic task, DPO and GRPO on the same task, then
`apogee eval` the five checkpoints side by side.

    python bench/walkthrough.py                 # the full version (the README's numbers)
    python bench/walkthrough.py --quick         # a few steps per stage (the test suite runs this)

Every command is printed before it runs, with its wall time after it; the last output is the
eval table (with --json, the eval's JSON rows), which the README shows.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(pretrain=60, branch=40, sft=600, dpo=20, grpo=30, interval=20, eval_iters=2, group=8, corpus=None)
QUICK = dict(pretrain=4, branch=2, sft=2, dpo=2, grpo=2, interval=2, eval_iters=1, group=2, corpus="corpus.jsonl")
"""Steps per stage; the quick version pre-trains on a small pseudo-English corpus instead of the stdlib's source."""


def commands(root: str, scale: dict) -> list[list[str]]:
    """The walkthrough's commands for run root `root` (the README's, with RUN=root)."""
    s, data = scale, f"{root}/data"
    small = ["logging.tensorboard=false", f"data.cache_dir={root}/cache"]
    post = ["model.seq_length=32", f"train.eval_interval={s['interval']}", "train.eval_iters=2", *small]
    corpus = [f"data.inputs=[{data}/{s['corpus']}]"] if s["corpus"] else []
    steps = [
        ["python", "-m", "data_pipeline.arithmetic", data],
        ["apogee", "pretrain", "--run-dir", f"{root}/base", "--set", f"train.steps={s['pretrain']}", "optim.schedule=wsd",
         f"optim.wsd_decay_start={s['pretrain']}", f"checkpoint.interval={s['branch']}", "data.split=969,30,1",
         f"train.eval_interval={s['interval']}", f"train.eval_iters={s['eval_iters']}", "train.log_interval=10", *corpus,
         *small],
        ["apogee", "midtrain", "--run-dir", f"{root}/midtrain", "--set",
         f"midtrain.branch_from={root}/base/checkpoints/step_{s['branch']:08d}", "optim.schedule=wsd",
         f"train.steps={s['pretrain']}", "data.split=969,30,1", f"train.eval_interval={s['interval'] // 2 or 1}",
         f"train.eval_iters={s['eval_iters']}", "train.log_interval=10", *corpus, *small],
        ["apogee", "sft", "--run-dir", f"{root}/sft", "--set", f"train.init_from={root}/midtrain/checkpoints",
         f"sft.inputs=[{data}/sft.jsonl]", f"sft.valid_inputs=[{data}/sft_valid.jsonl]", f"train.steps={s['sft']}",
         "optim.lr=1e-3", "optim.warmup_steps=10", "train.log_interval=25", *post],
        ["apogee", "dpo", "--run-dir", f"{root}/dpo", "--set", f"train.init_from={root}/sft/checkpoints",
         f"dpo.inputs=[{data}/pairs.jsonl]", f"dpo.valid_inputs=[{data}/pairs_valid.jsonl]", f"train.steps={s['dpo']}",
         "optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_steps=5", "train.log_interval=10", *post],
        ["apogee", "grpo", "--run-dir", f"{root}/grpo", "--set", f"train.init_from={root}/dpo/checkpoints",
         f"grpo.inputs=[{data}/prompts.jsonl]", f"grpo.valid_inputs=[{data}/prompts_valid.jsonl]",
         f"train.steps={s['grpo']}", f"grpo.group_size={s['group']}", "grpo.max_new_tokens=4",
         "train.global_batch_size=8", "train.micro_batch_size=4", "optim.lr=2e-4", "optim.min_lr=2e-5", "optim.warmup_steps=5",
         "train.log_interval=10", *post],
        ["apogee", "eval", "--checkpoint", *(f"{root}/{run}" for run in ("base", "midtrain", "sft", "dpo", "grpo")),
         "--data", f"{data}/heldout.jsonl", "--seq-length", "32", "--tasks", f"{data}/tasks.jsonl",
         "--max-new-tokens", "4", "--plot", f"{root}/curves.png"],
    ]
    if s["corpus"]:
        steps.insert(1, ["python", "-c", f"from data_pipeline.words_corpus import write_corpus; write_corpus({data!r})"])
    return steps


def _argv(command: list[str]) -> list[str]:
    """The command as this interpreter runs it (`apogee X` is `python -m cli.main X`)."""
    if command[0] == "apogee":
        return [sys.executable, "-m", "cli.main", *command[1:]]
    return [sys.executable, *command[1:]]  # python -m ... / python -c ...


def run(root: str, scale: dict, json_eval: bool = False) -> str:
    """Run every command in order (stopping at the first failure); returns the eval's output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    output = ""
    for command in commands(root, scale):
        if json_eval and command[:2] == ["apogee", "eval"]:
            command = [*command, "--json"]
        print(f"$ {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        last = command[:2] == ["apogee", "eval"]
        result = subprocess.run(_argv(command), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE if last else None)
        print(f"  ({time.perf_counter() - start:.0f} s, exit status {result.returncode})", flush=True)
        if result.returncode != 0:
            raise SystemExit(f"walkthrough: {command[0]} {command[1]} failed with exit status {result.returncode}")
        if last:
            output = result.stdout
            print(output, flush=True)
    return output


def main() -> None:
    """Run the walkthrough (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/walkthrough", help="run root (default runs/walkthrough)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage")
    parser.add_argument("--json", action="store_true", help="the eval prints JSON rows")
    args = parser.parse_args()
    out = run(args.root, QUICK if args.quick else FULL, args.json)
    if args.json:
        rows = json.loads(out)
        print(f"walkthrough: GRPO accuracy {rows[-1].get('accuracy')} vs base {rows[0].get('accuracy')}")


if __name__ == "__main__":
    main()

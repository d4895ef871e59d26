"""Soak: many kills at random steps on a longer run; the result must stay bitwise equal to a clean run.

    python bench/soak_restarts.py [--kills 10] [--steps 100] [--seed 0] [--nproc 2] [--interval 5]

Runs `apogee pretrain --nproc N` once clean and once with `--kills` kill faults (random ranks,
distinct random steps, resilience.max_restarts = kills), then prints per failure the step, the
checkpoint resumed from, the work lost (steps, seconds) and the downtime, and the totals: wall
time of both runs, the goodput (clean time / faulty time) and whether losses and final weights
are bitwise equal. A benchmark prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.state.export import load_model  # noqa: E402
from data_pipeline.words_corpus import make_dataset  # noqa: E402


def run(dataset: str, run_dir: Path, steps: int, nproc: int, interval: int, faults: list[str]) -> float:
    """One `apogee pretrain` run; returns its wall time (raises if it fails)."""
    settings = [f"train.steps={steps}", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
                "train.micro_batch_size=2", f"checkpoint.interval={interval}", "logging.tensorboard=false",
                f"data.inputs=[{dataset}]", f"data.cache_dir={run_dir.parent / 'cache'}",
                f"resilience.max_restarts={len(faults)}", f"resilience.inject=[{', '.join(faults)}]"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cli.main", "pretrain", "--nproc", str(nproc),
                             "--run-dir", str(run_dir), "--set", *settings], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--interval", type=int, default=5, help="checkpoint.interval")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    steps = sorted(rng.sample(range(2, args.steps + 1), args.kills))
    faults = [f"kill:rank={rng.randrange(args.nproc)}:step={step}" for step in steps]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp)
        clean_s = run(dataset, tmp / "clean", args.steps, args.nproc, args.interval, [])
        faulty_s = run(dataset, tmp / "faulty", args.steps, args.nproc, args.interval, faults)
        events = read_jsonl(tmp / "faulty" / "events.jsonl")
        failures = [e for e in events if e["type"] == "failure"]
        resumes = [e for e in events if e["type"] == "resume"]
        losses = {r["step"]: r["loss"] for r in read_jsonl(tmp / "faulty" / "metrics.jsonl")}
        clean_losses = {r["step"]: r["loss"] for r in read_jsonl(tmp / "clean" / "metrics.jsonl")}
        last = f"step_{args.steps:08d}"
        weights = load_model(tmp / "faulty" / "checkpoints" / last).state_dict()
        clean_weights = load_model(tmp / "clean" / "checkpoints" / last).state_dict()
        same_weights = all(torch.equal(weights[k], v) for k, v in clean_weights.items())

    print(f"soak: {args.kills} kills over {args.steps} steps, {args.nproc} ranks, checkpoint every "
          f"{args.interval} steps, seed {args.seed}")
    print(f"{'fault':<22} {'failed at':>9} {'resumed from':>12} {'lost steps':>10} {'lost s':>7} {'downtime s':>10}")
    for fault, failure, resume in zip(faults, failures, resumes):
        print(f"{fault:<22} {failure['step']:>9} {resume['step']:>12} {resume['work_lost_steps']:>10} "
              f"{resume['work_lost_s']:>7.2f} {resume['downtime_s']:>10.1f}")
    lost_steps = sum(r["work_lost_steps"] for r in resumes)
    downtime = sum(r["downtime_s"] for r in resumes)
    print(f"failures recorded: {len(failures)}, restarts: {sum(e['type'] == 'restart' for e in events)}, "
          f"resumes: {len(resumes)}, faults fired: {sum(e['type'] == 'fault_injected' for e in events)}")
    print(f"work lost: {lost_steps} steps re-run; downtime {downtime:.1f} s in total "
          f"({downtime / max(1, len(resumes)):.1f} s per restart)")
    print(f"wall time: clean {clean_s:.1f} s, with {args.kills} kills {faulty_s:.1f} s; goodput {clean_s / faulty_s:.2f}")
    print(f"per-step losses bitwise equal to the clean run: {losses == clean_losses} ({len(losses)} steps)")
    print(f"final weights bitwise equal to the clean run: {same_weights}")


if __name__ == "__main__":
    main()

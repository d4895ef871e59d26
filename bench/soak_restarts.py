"""Soak: many kills at random steps on a longer run; the result must stay bitwise equal to a clean run.

    python bench/soak_restarts.py [--kills 10] [--steps 100] [--seed 0] [--nproc 2] [--interval 5] [--memory-interval 1]

Runs `apogee pretrain --nproc N` once clean, then twice with the same `--kills` kill faults (random
ranks, distinct random steps, resilience.max_restarts = kills): with disk checkpoints only, and
with memory snapshots (checkpoint.memory_interval, engine/state/memory_snapshots.py) beside them.
Prints per failure the step, the step resumed from and its source, the work lost (steps, seconds)
and the downtime, then both runs side by side: work lost, downtime, wall time, goodput (clean
time / faulty time) and whether losses and final weights are bitwise equal to the clean run's.
A benchmark prints; it asserts nothing.
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


def run(dataset: str, run_dir: Path, steps: int, nproc: int, interval: int, faults: list[str],
        memory_interval: int = 0) -> float:
    """One `apogee pretrain` run; returns its wall time (raises if it fails)."""
    settings = [f"train.steps={steps}", "model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=4",
                "train.micro_batch_size=2", f"checkpoint.interval={interval}", "logging.tensorboard=false",
                f"checkpoint.memory_interval={memory_interval}",
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


def summarise(name: str, run_dir: Path, faults: list[str], wall_s: float, clean_s: float, clean: Path,
              steps: int) -> dict:
    """Print one faulty run's failures and resumes; its totals."""
    events = read_jsonl(run_dir / "events.jsonl")
    failures = [e for e in events if e["type"] == "failure"]
    resumes = [e for e in events if e["type"] == "resume"]
    print(f"\n{name}:")
    print(f"{'fault':<22} {'failed at':>9} {'resumed from':>12} {'source':>7} {'lost steps':>10} {'lost s':>7} "
          f"{'downtime s':>10}")
    for fault, failure, resume in zip(faults, failures, resumes):
        print(f"{fault:<22} {failure['step']:>9} {resume['step']:>12} {resume.get('source', 'disk'):>7} "
              f"{resume['work_lost_steps']:>10} {resume['work_lost_s']:>7.2f} {resume['downtime_s']:>10.1f}")
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}
    clean_losses = {r["step"]: r["loss"] for r in read_jsonl(clean / "metrics.jsonl")}
    last = f"step_{steps:08d}"
    weights = load_model(run_dir / "checkpoints" / last).state_dict()
    clean_weights = load_model(clean / "checkpoints" / last).state_dict()
    return {"name": name, "failures": len(failures), "resumes": len(resumes),
            "lost_steps": sum(r["work_lost_steps"] for r in resumes),
            "lost_s": sum(r["work_lost_s"] for r in resumes),
            "downtime_s": sum(r["downtime_s"] for r in resumes), "wall_s": wall_s, "goodput": clean_s / wall_s,
            "bitwise": losses == clean_losses and all(torch.equal(weights[k], v) for k, v in clean_weights.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--interval", type=int, default=5, help="checkpoint.interval")
    parser.add_argument("--memory-interval", type=int, default=1, help="checkpoint.memory_interval of the memory run")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    steps = sorted(rng.sample(range(2, args.steps + 1), args.kills))
    faults = [f"kill:rank={rng.randrange(args.nproc)}:step={step}" for step in steps]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp)
        clean_s = run(dataset, tmp / "clean", args.steps, args.nproc, args.interval, [])
        rows = []
        for name, memory in (("disk only", 0), (f"memory snapshots every {args.memory_interval}", args.memory_interval)):
            run_dir = tmp / f"faulty-{memory}"
            wall_s = run(dataset, run_dir, args.steps, args.nproc, args.interval, faults, memory)
            rows.append(summarise(name, run_dir, faults, wall_s, clean_s, tmp / "clean", args.steps))

    print(f"\nsoak: {args.kills} kills over {args.steps} steps, {args.nproc} ranks, disk checkpoint every "
          f"{args.interval} steps, seed {args.seed}; clean run {clean_s:.1f} s")
    print(f"{'recovery':<28} {'failures':>8} {'resumes':>7} {'lost steps':>10} {'lost s':>7} {'downtime s':>10} "
          f"{'wall s':>7} {'goodput':>7} {'bitwise = clean':>15}")
    for r in rows:
        print(f"{r['name']:<28} {r['failures']:>8} {r['resumes']:>7} {r['lost_steps']:>10} {r['lost_s']:>7.2f} "
              f"{r['downtime_s']:>10.1f} {r['wall_s']:>7.1f} {r['goodput']:>7.2f} {str(r['bitwise']):>15}")


if __name__ == "__main__":
    main()

"""Checkpoint cost: the pause a training step sees (snapshot to host memory), the background write
time, the size on disk, and the load time, for the tiny config and a ~150M model.

    python bench/bench_checkpoint.py [--quick]

Single rank, real DCP files, fsync and SHA-256 manifest included (what a run pays). Timings are
printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from engine.state.checkpoint import Checkpointer
from engine.config import load_config
from engine.config_validation import validate
from engine.state.resume import checkpoint_store
from engine.train.trainer import Trainer
from parallel.topology import ParallelContext
from engine.train.synthetic_data import SyntheticData as FakeData  # noqa: E402

MODELS = {
    "tiny (fp32)": ["precision.dtype=fp32"],
    "~150M (bf16 + fp32 masters)": ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
                                    "model.num_kv_heads=12", "model.ffn_hidden_size=2048", "model.vocab_size=32000",
                                    "model.seq_length=128", "train.micro_batch_size=1", "train.global_batch_size=1",
                                    "precision.dtype=bf16"],
}


def measure(name: str, overrides: list[str], root: Path) -> dict:
    cfg = validate(load_config("configs/tiny.yaml", [*overrides, "train.steps=3"]), 1)
    trainer = Trainer(cfg, ParallelContext.single(), FakeData.for_config(cfg), run_dir=root / "run")
    trainer.train_step(0)
    events = []
    checkpointer = Checkpointer(checkpoint_store(cfg, root / "run"), 0, 1, "bench",
                                on_event=lambda kind, **fields: events.append(fields))
    first_pause = checkpointer.save(trainer, 1, trainer.checkpoint_metadata())
    checkpointer.wait()
    trainer.train_step(1)
    start = time.perf_counter()  # the second save reuses the host staging memory, as in a run
    pause = checkpointer.save(trainer, 2, trainer.checkpoint_metadata())
    checkpointer.wait()
    total = time.perf_counter() - start
    start = time.perf_counter()
    checkpointer.load(trainer, Path(events[-1]["path"]))
    load = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"model": name, "params": params, "bytes": events[-1]["bytes"], "pause_s": pause, "first_pause_s": first_pause,
            "write_s": events[-1]["write_s"], "save_total_s": total, "load_s": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, overrides in MODELS.items():
        if args.quick and not name.startswith("tiny"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(name, overrides, Path(tmp)))
    print(f"{'model':<30}{'params':>13}{'size MB':>10}{'1st pause ms':>13}{'pause ms':>10}{'write s':>9}"
          f"{'load s':>8}{'pause/write':>13}")
    for r in rows:
        print(f"{r['model']:<30}{r['params']:>13,}{r['bytes'] / 2**20:>10.1f}{r['first_pause_s'] * 1000:>13.1f}"
              f"{r['pause_s'] * 1000:>10.1f}"
              f"{r['write_s']:>9.2f}{r['load_s']:>8.2f}{r['pause_s'] / r['write_s']:>13.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Checkpoint cost: the pause a training step sees (snapshot to host memory), the background write
time, the size on disk, and the load time, for the tiny config and a ~150M model; then what
verifying a checkpoint at resume costs each rank at 1, 2 and 4 ranks for the same model.

    python bench/bench_checkpoint.py [--quick] [--verify-mb 256]

The first table is single rank, real DCP files, fsync and SHA-256 manifest included (what a run
pays). The second saves one model (`--verify-mb` of fp32 weights, row-sharded over the ranks as
tensor parallelism shards them) from 1, 2 and 4 real gloo ranks, each rank hashing its own files,
and times the resume-time verification: each rank checks its share of the files
(engine/state/resume.py: intact_for_all) against rank 0 checking them all, as before per-rank
digests. Timings are printed side by side, never asserted; on this machine the ranks share two
cores, so the per-rank figure falls less than it would with a core (or a node) per rank.
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
from engine.state.checkpoint_store import CheckpointStore, verify
from engine.state.manifest import load_manifest, verification_share, verify_files
from engine.state.resume import intact_for_all
from engine.state.views import GlobalShards
from engine.config import load_config
from engine.config_validation import validate
from engine.state.resume import checkpoint_store
from engine.train.trainer import Trainer
from parallel.spawn import run_distributed
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


SHARD_ROWS = 1024  # rows of each synthetic matrix; divisible by every rank count measured


def _verify_on_ranks(rank: int, world_size: int, megabytes: int, root: str) -> dict:
    """One rank: save its row shards of a `megabytes` fp32 model, then time the resume verification."""
    from parallel.collectives import CommLedger, barrier, world_group

    cols = 1024
    matrices = max(1, megabytes * 2**20 // (SHARD_ROWS * cols * 4))
    rows = SHARD_ROWS // world_size
    generator = torch.Generator().manual_seed(rank)
    views = {f"model/layer{i}.weight": GlobalShards((SHARD_ROWS, cols), [((rank * rows, 0),
                                                    torch.randn(rows, cols, generator=generator))])
             for i in range(matrices)}
    checkpointer = Checkpointer(CheckpointStore(Path(root) / f"ranks{world_size}"), rank, world_size, "bench")
    start = time.perf_counter()
    checkpointer.save_views(views, {}, 1, {}, blocking=True)
    write_s = time.perf_counter() - start
    path = checkpointer.store.published()[-1].path
    world = world_group(CommLedger())
    barrier(world)
    start = time.perf_counter()  # this rank's own share alone: what verifying costs it
    manifest = load_manifest(path)
    assert verify_files(path, manifest, verification_share(manifest, rank, world_size)) is None
    own_s = time.perf_counter() - start
    barrier(world)
    start = time.perf_counter()  # as at resume: every rank its share, the answers combined
    problem = intact_for_all(path, checkpointer.group, rank)
    verify_s = time.perf_counter() - start
    barrier(world)
    all_s = None
    if rank == 0:  # the way before per-rank digests: rank 0 hashes every file while the others wait
        start = time.perf_counter()
        assert verify(path) is None
        all_s = time.perf_counter() - start
    own = sum(v.pieces[0][1].numel() * 4 for v in views.values())
    return {"rank": rank, "problem": problem, "write_s": write_s, "own_s": own_s, "verify_s": verify_s,
            "all_s": all_s, "own_bytes": own}


def measure_verification(megabytes: int, worlds=(1, 2, 4)) -> list[dict]:
    """Verify seconds per rank for the same model saved from each world size."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            if world == 1:
                results = [_verify_on_ranks(0, 1, megabytes, tmp)]
            else:
                results = run_distributed(_verify_on_ranks, world, megabytes, tmp, timeout=900)
            assert all(r["problem"] is None for r in results), results
            rows.append({"ranks": world, "own_mb": max(r["own_bytes"] for r in results) / 2**20,
                         "own_share_s": max(r["own_s"] for r in results),
                         "verify_s_per_rank": max(r["verify_s"] for r in results),
                         "rank0_verifies_all_s": results[0]["all_s"],
                         "write_s": max(r["write_s"] for r in results)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, and a 32 MB model to verify")
    parser.add_argument("--verify-mb", type=int, default=256, help="fp32 megabytes of the model verified")
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
    verify_mb = 32 if args.quick else args.verify_mb
    verification = measure_verification(verify_mb)
    print(f"\nverifying a {verify_mb} MB checkpoint at resume (each rank its own files vs rank 0 all of them)")
    print("  own share s: the slowest rank hashing its own files; verify s: the same with the answers combined "
          "(intact_for_all); rank 0 all s: one rank hashing every file")
    print(f"{'ranks':>6}{'MB per rank':>13}{'own share s':>13}{'verify s':>10}{'rank 0 all s':>14}"
          f"{'all/verify':>12}{'1 rank/verify':>15}")
    single = verification[0]["verify_s_per_rank"]
    for r in verification:
        print(f"{r['ranks']:>6}{r['own_mb']:>13.1f}{r['own_share_s']:>13.3f}{r['verify_s_per_rank']:>10.3f}"
              f"{r['rank0_verifies_all_s']:>14.3f}{r['rank0_verifies_all_s'] / r['verify_s_per_rank']:>12.2f}"
              f"{single / r['verify_s_per_rank']:>15.2f}")
    print(json.dumps(verification))


if __name__ == "__main__":
    main()

"""Pipeline bubble: each rank's measured idle fraction next to (p-1)/m and (1/v)(p-1)/m.

For each layout the trainer runs a few steps of a small fp32 model on gloo ranks (one process per
stage). Per rank and step, after aligning the stages with a barrier:
  span    = wall time of the schedule (trainer.forward_backward, which ends with the loss
            all-reduce over the PP group, so every stage's span ends together);
  compute = time inside forward and backward (StageComm.compute_seconds);
  idle    = span - compute   (waiting on neighbours, the bubble; p2p is the part spent blocked in the
            stage's batched send/receive exchanges, StageComm.wait_seconds).
Printed: idle / compute, the quantity Narayanan et al. (arXiv 2104.04473) write as (p-1)/m for 1F1B
and (1/v)(p-1)/m interleaved, and the same ratio from `parallel.pipeline.simulate` (unit costs,
backward = 2 x forward, free communication).

On this 2-core machine pp=4 puts 4 ranks on 2 cores: a waiting rank frees its core for the others,
so stages do not run at a fixed speed and the measured bubble of pp=4 is only indicative. The last
stage also computes the head and the loss, and the first the embedding, which unbalances stages.
Run: python bench/bench_pipeline.py [--steps N]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["model.hidden_size=256", "model.num_heads=8", "model.num_kv_heads=4", "model.ffn_hidden_size=512",
         "model.vocab_size=128", "model.seq_length=128", "model.num_layers=8", "train.micro_batch_size=2"]
LAYOUTS = {  # world size -> [(pp, v, m)]
    2: [(2, 1, 4), (2, 1, 8), (2, 2, 4), (2, 2, 8)],
    4: [(4, 1, 8), (4, 2, 8)],
}


def _worker(rank: int, world_size: int, layouts: list, steps: int) -> list:
    from engine.train.trainer import Trainer
    from bench.common import context_for, small_config
    from parallel.collectives import CommLedger, barrier
    from engine.train.synthetic_data import SyntheticData

    results = []
    for pp, v, m in layouts:
        overrides = [*MODEL, f"parallel.pp={pp}", f"parallel.virtual_stages={v}",
                     f"train.global_batch_size={2 * m}"]
        cfg = small_config(overrides, world_size, steps + 1)
        ctx = context_for(cfg)
        trainer = Trainer(cfg, ctx, SyntheticData.for_config(cfg))
        rows = []
        for step in range(steps + 1):  # step 0 warms up
            microbatches = trainer.microbatches(step)
            trainer.grads.start_step()
            barrier(ctx.comm_group("pp", CommLedger()))
            start = time.perf_counter()
            trainer.forward_backward(microbatches)
            span = time.perf_counter() - start
            trainer.grads.finish()
            trainer.optimizer_step(step)
            comm = trainer.stage_comm
            if step:
                rows.append((span, comm.compute_seconds, comm.wait_seconds))
        span, compute, wait = (sum(r[i] for r in rows) / len(rows) for i in range(3))
        results.append(dict(pp=pp, v=v, m=m, rank=ctx.pp_rank, span=span, compute=compute, p2p=wait))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per layout (after one warm-up)")
    args = parser.parse_args()
    from parallel.pipeline import simulate
    from parallel.spawn import run_distributed

    print(f"{'layout':<14} {'rank':>4} {'span ms':>8} {'compute':>8} {'p2p':>7} {'idle/compute':>12} "
          f"{'simulated':>9} {'formula':>8}")
    for world, layouts in LAYOUTS.items():
        per_rank = run_distributed(_worker, world, layouts, args.steps, timeout=900)
        for index, (pp, v, m) in enumerate(layouts):
            sim = simulate(pp, m, v)
            formula = (pp - 1) / (v * m)
            for rank_results in per_rank:
                r = rank_results[index]
                idle = r["span"] - r["compute"]
                name = f"pp={pp} v={v} m={m}"
                print(f"{name:<14} {r['rank']:>4} {1e3 * r['span']:>8.1f} {1e3 * r['compute']:>8.1f} "
                      f"{1e3 * r['p2p']:>7.1f} {idle / r['compute']:>12.3f} {sim.bubble_fraction(r['rank']):>9.3f} "
                      f"{formula:>8.3f}")


if __name__ == "__main__":
    main()

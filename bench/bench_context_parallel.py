"""Context parallelism against data parallelism: tokens/s of cp=2 and dp=2, before and after a change.

Both layouts train the same bf16 model at seq 2048 on 2 gloo ranks (one thread each): dp=2 runs
one whole sequence per rank (2 x 2048 tokens a step, attention by ATen's flash kernel), cp=2
splits one sequence over the ranks (2048 tokens a step, ring attention). Tokens/s is global
tokens over the median step time (after one warm-up step), steps aligned by a barrier.

Each code tree is measured in its own process: the current checkout, and a git revision exported
to a temporary directory (`--before`, default 11574ef: ring attention with fp32 matmul blocks and
unbatched p2p, the branch point of the flash ring). Rounds alternate before/after because the
machine is shared; the table shows each round and the medians side by side.

    PYTHONPATH=. python bench/bench_context_parallel.py [--before REV] [--steps 3] [--rounds 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--tree" in sys.argv:  # measuring a tree: its packages come first (spawned ranks inherit sys.path)
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])
else:
    sys.path.insert(0, ROOT)

MODEL = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=4", "model.ffn_hidden_size=1024",
         "model.vocab_size=256", "model.num_layers=2", "model.seq_length=2048", "train.micro_batch_size=1",
         "precision.dtype=bf16"]
LAYOUTS = {"dp2": ["parallel.dp=2", "train.global_batch_size=2"],
           "cp2": ["parallel.cp=2", "train.global_batch_size=1"]}


def _tree_api():
    """(Trainer, config builder, context builder, data class) of whichever code tree is on sys.path: this
    checkout's rooms, or the flat engine/ of the 'before' revision (imported by name, so either works)."""
    import importlib

    import torch

    from engine.config import load_config
    from engine.config_validation import validate

    def module(*names):
        for name in names:
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
        raise ImportError(f"none of {names}")

    trainer_module = module("engine.train.trainer", "engine.trainer")
    trainer = trainer_module.Trainer
    topology = module("parallel.topology")
    # The flat 'before' tree takes plain token tensors; its data_pipeline may be a namespace package
    # that also finds this checkout's Microbatch, which it cannot read.
    microbatch = (getattr(module("data_pipeline.microbatch", "data_pipeline.loader"), "Microbatch", None)
                  if trainer_module.__name__ == "engine.train.trainer" else None)

    def config(overrides, world_size, steps):
        return validate(load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [*overrides, f"train.steps={steps}"]),
                        world_size)

    def context(cfg):
        if hasattr(cfg.parallel, "validate"):  # the parallel section is the layout itself
            return topology.ParallelContext.create(cfg.parallel)
        p = cfg.parallel
        return topology.ParallelContext.create(topology.ParallelDims(tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp, ep=p.ep))

    class RandomTokens:
        """Uniform tokens seeded by the global sample position (the same batches in both trees)."""

        def __init__(self, cfg):
            self.cfg = cfg

        def microbatch(self, step, j, dp_rank, dp_size, skip_steps=()):
            t = self.cfg.train
            first = step * t.global_batch_size + (j * dp_size + dp_rank) * t.micro_batch_size
            tokens = torch.stack([torch.randint(0, self.cfg.model.vocab_size, (self.cfg.model.seq_length + 1,),
                                                generator=torch.Generator().manual_seed(first + i))
                                  for i in range(t.micro_batch_size)])
            return microbatch(tokens) if microbatch is not None else tokens

    return trainer, config, context, RandomTokens


def _worker(rank: int, world_size: int, steps: int) -> dict:
    import torch.distributed as dist

    Trainer, config, context, RandomTokens = _tree_api()
    results = {}
    for name, overrides in LAYOUTS.items():
        cfg = config([*MODEL, *overrides], world_size, steps + 1)
        trainer = Trainer(cfg, context(cfg), RandomTokens(cfg))
        times = []
        for step in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        results[name] = {"step_s": statistics.median(times[1:]), "tokens": tokens}
    return results


def measure(steps: int) -> dict:
    """Run both layouts on 2 ranks of the tree on sys.path; returns rank 0's {layout: step_s, tokens}."""
    import importlib

    spawn = importlib.import_module("parallel.spawn" if os.path.exists(os.path.join(sys.path[0], "parallel", "spawn.py"))
                                    else "tests.distributed")  # the 'before' tree kept it under tests/
    return spawn.run_distributed(_worker, 2, steps, timeout=3600)[0]


def _measure_tree(tree: str, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    command = [sys.executable, os.path.abspath(__file__), "--tree", tree, "--steps", str(steps)]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="11574ef", help="git revision of the 'before' code (default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per layout (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating before/after rounds")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree:
        print(json.dumps(measure(args.steps)))
        return
    with tempfile.TemporaryDirectory() as before_tree:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.before], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
        for helper in os.listdir(os.path.join(ROOT, "data_pipeline")):  # the built C++ extension is not in git
            if helper.startswith("_helpers") and helper.endswith(".so"):
                subprocess.run(["cp", os.path.join(ROOT, "data_pipeline", helper),
                                os.path.join(before_tree, "data_pipeline")], check=True)
        rows = {"before": [], "after": []}
        for _ in range(args.rounds):
            rows["before"].append(_measure_tree(before_tree, args.steps))
            rows["after"].append(_measure_tree(ROOT, args.steps))
    print(f"seq 2048, bf16, 2 ranks x 1 thread; before = {args.before}, after = this checkout")
    print(f"{'code':<7} {'round':>5} {'dp2 tok/s':>10} {'cp2 tok/s':>10} {'cp2/dp2':>8}")
    medians = {}
    for code, runs in rows.items():
        for i, run in enumerate(runs):
            speed = {name: r["tokens"] / r["step_s"] for name, r in run.items()}
            print(f"{code:<7} {i:>5} {speed['dp2']:>10.0f} {speed['cp2']:>10.0f} {speed['cp2'] / speed['dp2']:>8.2f}")
        medians[code] = {name: statistics.median(r[name]["tokens"] / r[name]["step_s"] for r in runs)
                         for name in LAYOUTS}
    for code, speed in medians.items():
        print(f"{code:<7} {'med':>5} {speed['dp2']:>10.0f} {speed['cp2']:>10.0f} {speed['cp2'] / speed['dp2']:>8.2f}")
    print(f"cp2 after / before: {medians['after']['cp2'] / medians['before']['cp2']:.2f}x; "
          f"dp2 after / before: {medians['after']['dp2'] / medians['before']['dp2']:.2f}x (same code path: noise)")


if __name__ == "__main__":
    main()

"""Activation memory as measured: bytes the engine's forward leaves for backward, per layer, next
to the performance model's formula (engine/perf/memory.py, one named term per saved tensor).

For each configuration the engine's Trainer builds the model chunk (its TP/SP/CP plan, bf16) and
runs one microbatch; engine/perf/activation_meter.py counts the distinct storages that forward
allocated and that are still alive once forward and loss returned (autograd's saved tensors,
seen through saved-tensor hooks, and what non-reentrant checkpointing keeps), and the peak of
live bytes through backward. Two depths (2 and 4 layers) give the bytes per layer (the
difference / 2) and the rest (embedding, head, loss, RoPE). Dense and MoE layers, recompute
none/selective/full on one rank; tensor parallelism with and without sequence parallelism and
context parallelism on two gloo ranks (parallel.spawn.run_distributed; rank 0's figures, the ranks
are symmetric).

Deviation of a configuration: the larger of |measured/formula - 1| per layer and for the whole
4-layer microbatch; the last line is the largest over all configurations. The peak column
(informational) compares the measured peak with the formula's held bytes plus its largest
transient (engine/perf/memory.transient_bytes), a rougher estimate (within ~12% here).

Run: python bench/bench_activation_memory.py [--quick]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = ["model.hidden_size=256", "model.num_heads=8", "model.num_kv_heads=2", "model.ffn_hidden_size=768",
         "model.vocab_size=512", "model.seq_length=128", "train.micro_batch_size=2", "precision.dtype=bf16",
         "optim.warmup_steps=0"]
MOE = ["model.num_experts=4", "model.moe_topk=2", "model.moe_ffn_hidden_size=256"]
RECOMPUTE = ("none", "selective", "full")


def configurations(quick: bool = False) -> dict:
    """{world size: [(name, overrides)]}: the bench's configurations (quick: four of them)."""
    one = [(f"{kind} recompute={r}", [*extra, f"model.recompute={r}"])
           for kind, extra in (("dense", []), ("moe", MOE)) for r in RECOMPUTE]
    two = [(f"dense tp=2 sp={'on' if sp else 'off'} recompute={r}",
            ["parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}", f"model.recompute={r}"])
           for sp in (False, True) for r in RECOMPUTE]
    two += [(f"dense cp=2 recompute={r}", ["parallel.cp=2", f"model.recompute={r}"]) for r in RECOMPUTE]
    if quick:
        one = [one[0], one[4]]
        two = [two[4], two[6]]
    return {1: one, 2: two}


def _overrides(world: int, extra: list) -> list:
    from engine.config import load_config

    par = load_config(None, [o for o in extra if o.startswith("parallel.")]).parallel
    dp = world // (par.tp * par.cp)
    return [*MODEL, f"train.global_batch_size={2 * dp}", f"parallel.dp={dp}", *extra]


def run(quick: bool = False) -> list[dict]:
    """Measure every configuration and compare it with the formula: one row per configuration."""
    from engine.perf.activation_meter import compare_with_formula, measure_depths
    from parallel.spawn import run_distributed

    rows = []
    for world, configs in configurations(quick).items():
        overrides = [_overrides(world, extra) for _, extra in configs]
        measured = run_distributed(measure_depths, world, overrides, timeout=900)[0]
        for (name, _), over, by_depth in zip(configs, overrides, measured):
            rows.append({"name": name, **compare_with_formula(over, world, by_depth)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four configurations")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print("bf16, b=2, s=128, h=256, 8 heads / 2 KV heads, ffn 768 (MoE: 4 experts, top-2, ffn 256), vocab 512; "
          "bytes of one microbatch")
    print(f"{'configuration':<36} {'layer meas':>11} {'formula':>11} {'hooks':>11} {'4-layer meas':>13} "
          f"{'formula':>11} {'dev':>6} {'peak meas':>11} {'formula':>11}")
    for r in rows:
        print(f"{r['name']:<36} {r['layer']:>11,.0f} {r['layer_formula']:>11,.0f} {r['hooks']:>11,.0f} "
              f"{r['held']:>13,} {r['held_formula']:>11,.0f} {100 * r['deviation']:>5.1f}% "
              f"{r['peak']:>11,} {r['peak_formula']:>11,.0f}")
    peak = max(abs(r["peak"] / r["peak_formula"] - 1) for r in rows)
    print(f"peak through backward (held + largest transient, informational): max deviation {100 * peak:.1f}%")
    worst = max(r["deviation"] for r in rows)
    print(f"activation memory: max deviation {100 * worst:.1f}% over {len(rows)} configurations")


if __name__ == "__main__":
    main()

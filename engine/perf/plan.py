"""The layout planner and `apogee plan`: every valid layout of a model on N GPUs, ranked by the step
time engine.perf.perf_model predicts, with the layouts that do not fit in GPU memory dropped.

A candidate fixes tp (inside a node), cp, pp, dp = N / (tp*cp*pp), ep (MoE), virtual stages,
micro-batch size, ZeRO stage and recomputation; sequence parallelism is on whenever tp > 1 (same
traffic, less memory). The global batch and sequence length stay those of the config. Each
candidate passes engine.config_validation.validate, so the planner proposes only layouts the
engine accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from engine.config import ApogeeConfig, ConfigError
from engine.config_validation import validate
from parallel.layout import ParallelLayout
from engine.perf.perf_model import (Assumptions, Cluster, Layout, StepEstimate, estimate_step,
                               known_gpus)

RECOMPUTE_MODES = ("none", "selective", "full")
"""Recomputation modes the planner tries."""

MAX_VIRTUAL_STAGES = 8
"""Largest number of model chunks per pipeline rank tried."""

MAX_MICRO_BATCH = 16
"""Largest micro-batch size tried."""


class PlanError(ValueError):
    """Planner input that cannot be used; the message names the option, the value and what is valid."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _accepted(cfg: ApogeeConfig, layout: Layout) -> tuple[bool, str]:
    """Whether engine.config_validation accepts `layout` for `cfg` (and its message if not)."""
    candidate = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, recompute=layout.recompute),
        parallel=ParallelLayout(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(ParallelLayout)
                                   if f.name != "grad_bucket_mb"}, grad_bucket_mb=cfg.parallel.grad_bucket_mb),
        train=dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size))
    try:
        validate(candidate, layout.world)
    except ConfigError as error:
        return False, str(error)
    return True, ""


def _virtual_stages(num_layers: int, pp: int) -> list[int]:
    """1, and with pp > 1 every v <= MAX_VIRTUAL_STAGES that splits the layers into equal chunks
    (uneven chunks only slow the busiest stage down)."""
    return [1] + [v for v in range(2, MAX_VIRTUAL_STAGES + 1) if pp > 1 and num_layers % (pp * v) == 0]


def candidate_layouts(cfg: ApogeeConfig, world: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout of `world` GPUs that the engine accepts for `cfg` (tp within one node).

    ZeRO-3 with full recomputation is skipped: parallel/zero3.py refuses it at run time.
    """
    m, batch = cfg.model, cfg.train.global_batch_size
    for tp in (t for t in _divisors(min(gpus_per_node, world)) if world % t == 0):
        for cp in (c for c in _divisors(world // tp) if c & (c - 1) == 0):
            for pp in _divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                for ep in (_divisors(m.num_experts) if m.num_experts else [1]):
                    for v in _virtual_stages(m.num_layers, pp):
                        for b in (b for b in _divisors(MAX_MICRO_BATCH) if batch % (b * dp) == 0):
                            for zero in (0, 1, 2, 3):
                                base = Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, virtual_stages=v, micro_batch_size=b,
                                              global_batch_size=batch, zero=zero, sequence_parallel=tp > 1)
                                if not _accepted(cfg, base)[0]:
                                    continue
                                for recompute in RECOMPUTE_MODES:
                                    if not (zero == 3 and recompute == "full"):
                                        yield dataclasses.replace(base, recompute=recompute)


def plan(cfg: ApogeeConfig, world: int, cluster: Cluster, top: int = 5,
         assume: Assumptions = Assumptions()) -> tuple[list[StepEstimate], dict]:
    """The `top` fastest layouts that fit in memory, fastest first (see _rank_key), and
    counts {'valid', 'fit'}. PlanError when no layout is valid or none fits."""
    if world < 1:
        raise PlanError(f"--gpus={world}: must be >= 1")
    if world > cluster.gpus_per_node and world % cluster.gpus_per_node:
        raise PlanError(f"--gpus={world}: must be a multiple of --gpus-per-node={cluster.gpus_per_node} "
                        f"(whole nodes), or at most {cluster.gpus_per_node}")
    estimates = [estimate_step(cfg.model, layout, cluster, assume)
                 for layout in candidate_layouts(cfg, world, cluster.gpus_per_node)]
    if not estimates:
        probe = Layout(dp=world, global_batch_size=cfg.train.global_batch_size)
        reason = _accepted(cfg, probe)[1] or "no tp/cp/pp/dp split passes config validation"
        raise PlanError(f"--gpus={world}: no valid layout of {cfg.name} on {world} GPUs; e.g. dp={world}: {reason}")
    fitting = sorted((e for e in estimates if e.fits), key=_rank_key)
    if not fitting:
        smallest = min(estimates, key=lambda e: e.memory.total)
        raise PlanError(
            f"--gpus={world}: no valid layout of {cfg.name} fits in {cluster.gpu.name} memory "
            f"({cluster.gpu.hbm_bytes / 1e9:.0f} GB); the smallest needs {smallest.memory.total / 1e9:.1f} GB "
            f"per GPU ({describe(smallest.layout)}); use more GPUs or a GPU with more memory "
            f"(valid --gpu: {', '.join(known_gpus())})")
    return fitting[:top], {"valid": len(estimates), "fit": len(fitting)}


def _rank_key(estimate: StepEstimate) -> tuple:
    """Fastest first; at equal time (to the microsecond) less memory, then fewer parallel dimensions."""
    lay = estimate.layout
    return (round(estimate.step_time, 6), round(estimate.memory.total / 1e6), lay.cp, lay.pp, lay.virtual_stages, lay.tp)


def describe(layout: Layout) -> str:
    """One-line summary of a layout: tp=.. cp=.. pp=.. dp=.. ..."""
    return (f"tp={layout.tp} cp={layout.cp} pp={layout.pp} dp={layout.dp} ep={layout.ep} "
            f"v={layout.virtual_stages} mbs={layout.micro_batch_size} zero={layout.zero} "
            f"recompute={layout.recompute}")


def estimate_dict(estimate: StepEstimate) -> dict:
    """A StepEstimate as plain JSON-able values (the --json rows)."""
    memory = dataclasses.asdict(estimate.memory)
    memory["total"] = estimate.memory.total
    return {**dataclasses.asdict(estimate.layout), "step_time_s": estimate.step_time,
            "tokens_per_s": estimate.tokens_per_s, "mfu": estimate.mfu, "memory_bytes": memory,
            "times_s": dict(estimate.times), "dominant": estimate.dominant}


def format_table(estimates: list[StepEstimate]) -> str:
    """The planner's table: one row per layout, fastest first."""
    header = (f"{'rank':>4} {'tp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'ep':>3} {'v':>2} {'mbs':>3} {'zero':>4} "
              f"{'recompute':<9} {'sp':<3} {'step s':>8} {'tokens/s':>12} {'MFU':>6} {'mem GB':>7}  dominant")
    rows = [header]
    for rank, e in enumerate(estimates, 1):
        lay = e.layout
        rows.append(f"{rank:>4} {lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>5} {lay.ep:>3} {lay.virtual_stages:>2} "
                    f"{lay.micro_batch_size:>3} {lay.zero:>4} {lay.recompute:<9} {'yes' if lay.sequence_parallel else 'no':<3} "
                    f"{e.step_time:>8.4g} {e.tokens_per_s:>12,.0f} {100 * e.mfu:>5.1f}% {e.memory.total / 1e9:>7.1f}  "
                    f"{e.dominant} {100 * e.times[e.dominant] / e.step_time:.0f}%")
    return "\n".join(rows)

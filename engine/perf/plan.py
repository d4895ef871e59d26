"""The layout planner and `apogee plan`: every valid layout of a model on N GPUs, ranked by the step
time engine.perf.perf_model predicts.

A candidate fixes tp (inside a node), cp, pp, dp = N / (tp*cp*pp), ep (MoE), virtual stages,
micro-batch size, ZeRO stage and recomputation; sequence parallelism is on whenever tp > 1 (same
traffic, less memory) unless fixed. Fields given in `fixed` (`--layout tp=8,pp=16,dp=64`) are
kept and the others searched. The global batch and sequence length stay those of the config.
Each candidate passes engine.config_validation.validate, so the planner proposes only layouts
the engine accepts. Layouts that do not fit in GPU memory are dropped, or, with a fixed layout,
listed after the fitting ones (each group fastest first) so that one sees why.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

from engine.config import ApogeeConfig, ConfigError
from engine.config_validation import validate
from engine.perf.hardware import Cluster, known_gpus
from engine.perf.inputs import RECOMPUTE_MODES, Assumptions, Layout
from engine.perf.perf_model import StepEstimate, estimate_step
from parallel.layout import ParallelLayout

MAX_VIRTUAL_STAGES = 8
"""Largest number of model chunks per pipeline rank tried."""

MAX_MICRO_BATCH = 16
"""Largest micro-batch size tried."""

LAYOUT_KEYS = {"tp": "tp", "pp": "pp", "cp": "cp", "dp": "dp", "ep": "ep", "vp": "virtual_stages",
               "mbs": "micro_batch_size", "zero": "zero", "recompute": "recompute", "sp": "sequence_parallel"}
"""`--layout` keys and the Layout fields they fix."""


class PlanError(ValueError):
    """Planner input that cannot be used; the message names the option, the value and what is valid."""


def parse_layout(text: str) -> dict:
    """`--layout tp=8,pp=16,dp=64` -> {'tp': 8, 'pp': 16, 'dp': 64} (Layout field names); PlanError names the bad part."""
    fixed = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in LAYOUT_KEYS:
            raise PlanError(f"--layout {part!r}: expected KEY=VALUE with KEY one of {', '.join(LAYOUT_KEYS)}")
        field = LAYOUT_KEYS[key]
        if field == "recompute":
            if value not in RECOMPUTE_MODES:
                raise PlanError(f"--layout recompute={value!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
            fixed[field] = value
        elif field == "sequence_parallel":
            if value.lower() not in ("true", "false", "on", "off", "1", "0"):
                raise PlanError(f"--layout sp={value!r}: expected true or false")
            fixed[field] = value.lower() in ("true", "on", "1")
        else:
            if not value.isdigit() or (int(value) < 1 and field != "zero") or (field == "zero" and int(value) > 3):
                valid = "0, 1, 2 or 3" if field == "zero" else "a positive integer"
                raise PlanError(f"--layout {key}={value!r}: expected {valid}")
            fixed[field] = int(value)
    return fixed


def world_of(fixed: dict, gpus: Optional[int]) -> int:
    """The world size: --gpus, or tp*cp*pp*dp of a fixed layout (missing sizes count as 1);
    PlanError when neither is given or they disagree."""
    sizes = [fixed.get(k, 1) for k in ("tp", "cp", "pp", "dp")]
    product = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    if gpus is None:
        if not fixed:
            raise PlanError("--gpus: required unless --layout gives the layout (tp, cp, pp, dp; missing ones are 1)")
        return product
    if all(k in fixed for k in ("tp", "cp", "pp", "dp")) and product != gpus:
        raise PlanError(f"--layout: tp*cp*pp*dp = {product} does not equal --gpus={gpus}")
    if product and gpus % product:
        raise PlanError(f"--layout: tp*cp*pp*dp of the fixed sizes ({product}) does not divide --gpus={gpus}")
    return gpus


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _accepted(cfg: ApogeeConfig, layout: Layout) -> tuple[bool, str]:
    """Whether engine.config_validation accepts `layout` for `cfg` (and its message if not)."""
    candidate = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, recompute=layout.recompute),
        parallel=ParallelLayout(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(ParallelLayout)}),
        train=dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size))
    try:
        validate(candidate, layout.world)
    except ConfigError as error:
        return False, str(error)
    return True, ""


def _virtual_stages(num_layers: int, pp: int) -> list[int]:
    """1, and with pp > 1 every v <= MAX_VIRTUAL_STAGES with at least one layer per chunk (uneven
    chunks are priced by their busiest stage: 126 layers in pp=16 x v=2 chunks are as Llama 3 ran)."""
    return [1] + [v for v in range(2, MAX_VIRTUAL_STAGES + 1) if pp > 1 and num_layers >= pp * v]


def _choices(fixed: dict, field: str, options) -> list:
    return [fixed[field]] if field in fixed else list(options)


def candidate_layouts(cfg: ApogeeConfig, world: int, gpus_per_node: int, fixed: Optional[dict] = None) -> Iterator[Layout]:
    """Every layout of `world` GPUs that the engine accepts for `cfg` (tp within one node unless
    fixed), keeping the fields in `fixed`. ZeRO-3 with full recomputation is skipped:
    parallel/zero3.py refuses it at run time."""
    fixed = fixed or {}
    m, batch = cfg.model, cfg.train.global_batch_size
    for tp in _choices(fixed, "tp", (t for t in _divisors(min(gpus_per_node, world)) if world % t == 0)):
        for cp in _choices(fixed, "cp", (c for c in _divisors(world // tp) if c & (c - 1) == 0)):
            for pp in _choices(fixed, "pp", _divisors(world // (tp * cp)) if world % (tp * cp) == 0 else []):
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if fixed.get("dp", dp) != dp:
                    continue
                for ep in _choices(fixed, "ep", _divisors(m.num_experts) if m.num_experts else [1]):
                    for v in _choices(fixed, "virtual_stages", _virtual_stages(m.num_layers, pp)):
                        sizes = (b for b in _divisors(MAX_MICRO_BATCH) if batch % (b * dp) == 0)
                        for b in _choices(fixed, "micro_batch_size", sizes):
                            for zero in _choices(fixed, "zero", (0, 1, 2, 3)):
                                sp = fixed.get("sequence_parallel", tp > 1)
                                base = Layout(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, virtual_stages=v, micro_batch_size=b,
                                              global_batch_size=batch, zero=zero, sequence_parallel=sp,
                                              grad_bucket_mb=cfg.parallel.grad_bucket_mb,
                                              overlap_param_gather=cfg.parallel.overlap_param_gather)
                                if not _accepted(cfg, base)[0]:
                                    continue
                                for recompute in _choices(fixed, "recompute", RECOMPUTE_MODES):
                                    if not (zero == 3 and recompute == "full"):
                                        yield dataclasses.replace(base, recompute=recompute)


def plan(cfg: ApogeeConfig, world: int, cluster: Cluster, top: int = 5, assume: Assumptions = Assumptions(),
         fixed: Optional[dict] = None) -> tuple[list[StepEstimate], dict]:
    """The `top` fastest layouts that fit in memory, fastest first (see _rank_key), and counts
    {'valid', 'fit'}. With `fixed` fields, layouts that do not fit follow the fitting ones (each
    group fastest first, `top` in all). PlanError when no layout is valid, or none fits (unfixed)."""
    if world < 1:
        raise PlanError(f"--gpus={world}: must be >= 1")
    if world > cluster.gpus_per_node and world % cluster.gpus_per_node:
        raise PlanError(f"--gpus={world}: must be a multiple of --gpus-per-node={cluster.gpus_per_node} "
                        f"(whole nodes), or at most {cluster.gpus_per_node}")
    estimates = [estimate_step(cfg.model, layout, cluster, assume)
                 for layout in candidate_layouts(cfg, world, cluster.gpus_per_node, fixed)]
    if not estimates:
        if fixed:
            probe = Layout(**{"dp": world // max(1, fixed.get("tp", 1) * fixed.get("cp", 1) * fixed.get("pp", 1)),
                              **fixed}, global_batch_size=cfg.train.global_batch_size,
                           grad_bucket_mb=cfg.parallel.grad_bucket_mb)
            reason = _accepted(cfg, probe)[1] if probe.world == world else f"tp*cp*pp*dp = {probe.world} != {world}"
            raise PlanError(f"--layout: no valid layout of {cfg.name} on {world} GPUs keeps "
                            f"{', '.join(f'{k}={v}' for k, v in fixed.items())}: {reason or 'no split passes validation'}")
        probe = Layout(dp=world, global_batch_size=cfg.train.global_batch_size)
        reason = _accepted(cfg, probe)[1] or "no tp/cp/pp/dp split passes config validation"
        raise PlanError(f"--gpus={world}: no valid layout of {cfg.name} on {world} GPUs; e.g. dp={world}: {reason}")
    fitting = sorted((e for e in estimates if e.fits), key=_rank_key)
    if fixed:
        rest = sorted((e for e in estimates if not e.fits), key=_rank_key)
        return (fitting + rest)[:top], {"valid": len(estimates), "fit": len(fitting)}
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
            "times_s": dict(estimate.times), "dominant": estimate.dominant, "fits": estimate.fits}


def format_table(estimates: list[StepEstimate], hbm_bytes: float) -> str:
    """The planner's table: one row per layout in the given order, with its memory margin."""
    header = (f"{'rank':>4} {'tp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'ep':>3} {'v':>2} {'mbs':>3} {'zero':>4} "
              f"{'recompute':<9} {'sp':<3} {'step s':>8} {'tokens/s':>12} {'MFU':>6} {'mem GB':>7} {'margin':>7} "
              f"{'fits':<4}  dominant")
    rows = [header]
    for rank, e in enumerate(estimates, 1):
        lay = e.layout
        rows.append(f"{rank:>4} {lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>5} {lay.ep:>3} {lay.virtual_stages:>2} "
                    f"{lay.micro_batch_size:>3} {lay.zero:>4} {lay.recompute:<9} {'yes' if lay.sequence_parallel else 'no':<3} "
                    f"{e.step_time:>8.4g} {e.tokens_per_s:>12,.0f} {100 * e.mfu:>5.1f}% {e.memory.total / 1e9:>7.1f} "
                    f"{(hbm_bytes - e.memory.total) / 1e9:>+7.1f} {'yes' if e.fits else 'no':<4}  "
                    f"{e.dominant} {100 * e.times[e.dominant] / e.step_time:.0f}%")
    return "\n".join(rows)

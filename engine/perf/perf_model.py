"""Analytical performance model of one training step of this engine at cluster scale: time, MFU,
memory and traffic per GPU of the busiest pipeline stage.

It describes the engine as built (engine/perf/inputs.Assumptions' defaults, each checked against
the code) and, through other assumptions, other stacks (engine/perf/calibration.py):
- compute (engine/perf/compute.py): the layer's GEMMs at the roofline, the attention core (flash
  at cp = 1; ring attention's fp32 matmul blocks at cp > 1, as parallel/block_attention.py runs
  them off CPU), the eager element-wise work, the blockwise loss, recomputation (selective: the
  attention core; full: the layer's forward with its TP/CP/EP traffic);
- communication (engine/perf/comm.py: NCCL's ring/tree latency model, hierarchical rings, fabric
  tiers): TP/SP collectives per layer, exposed (the engine does not overlap them); the CP ring,
  each transfer hidden behind its block's compute; MoE all-to-alls; PP p2p, blocking, and the
  (interleaved) 1F1B bubble; DP as the engine does it: 25 MiB fp32 buckets reduced during the
  last backward (only the part longer than that backward, or the last bucket, is exposed, and
  compute slows while they run), each plain-DP bucket fingerprinted with a host sync, ZeRO-1/2's
  parameter all-gather after the step unoverlapped, ZeRO-2 reducing every microbatch, ZeRO-3
  gathering per layer with a prefetch;
- scale: collectives' per-step latency grows with the ranks and nodes of a group, fabric tiers
  lose bandwidth, and the step waits for the slowest of N GPUs (straggler_jitter);
- memory (engine/perf/memory.py): the engine's activation terms (measured), model states, the
  schedule's in-flight microbatches, transients.

Not modelled: host overheads beyond the loss's kernel launches, load imbalance between experts,
GEMM shape effects below the roofline, NCCL protocol choice for small messages, fp8, CPU offload,
checkpoint and data-loading stalls. The model is checked only against published tables
(tests/test_perf_model.py reports the error); nothing here ran on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import ModelConfig
from engine.perf.comm import (Placement, collective_seconds, cp_ring_bytes, dp_traffic_elements,  # noqa: F401
                              ep_all_to_all_bytes, place, tp_comm_bytes)
from engine.perf.compute import Pass, embedding_compute, head_compute, layer_compute
from engine.perf.hardware import Cluster, GPUSpec, known_gpus, make_cluster  # noqa: F401
from engine.perf.inputs import GIB, RECOMPUTE_MODES, Assumptions, Layout, PerfModelError  # noqa: F401
from engine.perf.memory import (ActivationShape, MemoryEstimate, activation_bytes_per_layer,  # noqa: F401
                                in_flight_microbatches, model_state_bytes, peak_memory, stage_layers,
                                stage_parameters)
from engine.train.metrics import flops_per_step

__all__ = [  # the model's own names, and the pieces it is built from, re-exported for callers and tests
    "StepEstimate", "estimate_step", "pipeline_bubble_fraction", "placements", "Assumptions", "Layout", "PerfModelError",
    "GIB", "Cluster", "GPUSpec", "known_gpus", "make_cluster", "MemoryEstimate", "activation_bytes_per_layer",
    "in_flight_microbatches", "model_state_bytes", "cp_ring_bytes", "dp_traffic_elements", "ep_all_to_all_bytes",
    "tp_comm_bytes"]


def pipeline_bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle time over ideal time: (p-1)/m for 1F1B, (1/v)(p-1)/m interleaved (Narayanan et al. 2021)."""
    return (pp - 1) / (virtual_stages * microbatches)


@dataclass
class StepEstimate:
    """Predicted step of one layout: seconds per cost (they add up to step_time), throughput, memory."""

    layout: Layout
    """The layout estimated."""
    times: dict
    """Seconds each cost adds to the step: compute, recompute, tp_comm, cp_comm, ep_comm,
    pp_bubble, pp_p2p, dp_comm (exposed part), optimizer, stragglers."""
    step_time: float
    """Seconds per optimizer step."""
    tokens_per_s: float
    """Global tokens per second."""
    mfu: float
    """Model FLOPs (no recomputation) per second over the peak of all GPUs."""
    memory: MemoryEstimate
    """Bytes per GPU."""
    fits: bool
    """Whether memory.total fits in the GPU's HBM."""

    @property
    def dominant(self) -> str:
        """The cost that adds the most time."""
        return max(self.times, key=self.times.get)


def placements(lay: Layout, cluster: Cluster) -> dict:
    """Each process group of `lay` on the nodes (rank order tp-cp-ep-dp-pp)."""
    n = cluster.gpus_per_node
    return {"tp": place(lay.tp, 1, n), "cp": place(lay.cp, lay.tp, n), "ep": place(lay.ep, lay.tp, n),
            "dp": place(lay.dp * lay.cp, lay.tp, n), "expert_dp": place(max(1, lay.dp * lay.cp // lay.ep), lay.tp * lay.ep, n),
            "pp": place(2, lay.tp * lay.cp * lay.dp, n) if lay.pp > 1 else place(1, 1, n)}


def _layer_seconds(cfg: ModelConfig, lay: Layout, cluster: Cluster, assume: Assumptions, groups: dict) -> dict:
    """Seconds per layer per microbatch on one GPU, by cost (fwd+bwd; 'recompute' its replay)."""
    x = ActivationShape.of(cfg, lay)
    work = layer_compute(x, lay.cp, lay.ep, cluster.gpu, assume)
    compute = work["gemm"] + work["attention"] + work["elementwise"]
    shard = x.dtype_bytes * x.h * x.tokens  # one [b, s, h] activation of the layer
    if x.sequence_parallel:
        one = sum(collective_seconds(op, shard, groups["tp"], cluster) for op in ("all_gather", "reduce_scatter"))
    else:
        one = collective_seconds("all_reduce", shard, groups["tp"], cluster)
    tp = Pass(2 * one, 2 * one) if lay.tp > 1 else Pass()
    tp = Pass((1 - assume.tp_overlap) * tp.forward, (1 - assume.tp_overlap) * tp.backward)
    cp = Pass()
    if lay.cp > 1:  # each ring step's transfer runs beside that step's block; the rest is exposed
        b_kv = x.b * x.s * x.kv_heads * x.head_dim / x.tp * x.dtype_bytes
        ring = Placement(2, groups["cp"].per_node if groups["cp"].nodes == 1 else 1,
                         1 if groups["cp"].nodes == 1 else 2, groups["cp"].reach)
        step_f = collective_seconds("send_recv", 2 * b_kv, ring, cluster)
        step_b = collective_seconds("send_recv", 2 * b_kv + 4 * b_kv, ring, cluster)
        att = work["attention"]
        cp = Pass((lay.cp - 1) * max(0.0, step_f - att.forward / lay.cp),
                  (lay.cp - 1) * max(0.0, step_b - att.backward / lay.cp)
                  + collective_seconds("send_recv", 4 * b_kv, ring, cluster))
        slow = assume.overlap_slowdown * (lay.cp - 1) * (min(step_f, att.forward / lay.cp) + min(step_b, att.backward / lay.cp))
        compute = compute + Pass(slow / 3, 2 * slow / 3)
    ep = Pass()
    if x.experts and lay.ep > 1:
        one = collective_seconds("all_to_all", x.dtype_bytes * x.h * x.topk * x.tokens, groups["ep"], cluster)
        ep = Pass(2 * one, 2 * one)
    replay = {"none": 0.0, "selective": work["attention"].forward + cp.forward,
              "full": compute.forward + tp.forward + cp.forward + ep.forward}[lay.recompute]
    return {"compute": compute.total, "recompute": replay, "tp_comm": tp.total, "cp_comm": cp.total,
            "ep_comm": ep.total, "backward": compute.backward + tp.backward + cp.backward + ep.backward + replay}


def _extras_seconds(cfg: ModelConfig, lay: Layout, cluster: Cluster, assume: Assumptions, groups: dict,
                    first: bool, last: bool, params: float) -> dict:
    """Seconds per microbatch of a stage outside its layers: embedding, head and loss (with their
    TP collectives), the fp32 accumulation of every gradient into main_grad."""
    x = ActivationShape.of(cfg, lay)
    compute = Pass()
    if first:
        compute = compute + embedding_compute(x, cluster.gpu)
    if last:
        compute = compute + head_compute(x, cluster.gpu, assume)
    tp = 0.0
    if lay.tp > 1:  # embedding's g / reduce-scatter and the head input's f / all-gather, each way
        shard = x.dtype_bytes * x.h * x.tokens
        op = ("all_gather", "reduce_scatter") if x.sequence_parallel else ("all_reduce",)
        one = sum(collective_seconds(o, shard, groups["tp"], cluster) for o in op)
        tp = (first + last) * one * (2 if x.sequence_parallel else 1) * (1 - assume.tp_overlap)
        if last:  # the vocab-parallel loss's max and sum all-reduces (3 values per token)
            tp += 2 * collective_seconds("all_reduce", 4 * x.tokens, groups["tp"], cluster)
    accumulate = 10 * params / (cluster.gpu.hbm_bandwidth * cluster.gpu.hbm_efficiency)  # fp32 add of bf16 grads
    return {"compute": compute.total + accumulate, "tp_comm": tp, "backward": compute.backward + accumulate}


def _bucketed(op: str, elements: float, bytes_per: float, group: Placement, cluster: Cluster, bucket_elements: float) -> tuple:
    """(seconds, buckets, seconds of one bucket) of `op` over `elements` cut into the engine's buckets."""
    if group.size <= 1 or elements <= 0:
        return 0.0, 0, 0.0
    buckets = math.ceil(elements / bucket_elements)
    one = collective_seconds(op, bytes_per * elements / buckets, group, cluster)
    return buckets * one, buckets, one


def _dp_seconds(lay: Layout, cluster: Cluster, assume: Assumptions, groups: dict, dense: float, expert: float,
                t_backward: float, t_forward: float, layers: int) -> tuple[float, float]:
    """(exposed DP/ZeRO seconds per step, compute slowdown from the overlapped part)."""
    m = lay.microbatches
    bucket = lay.grad_bucket_mb * 2**20 / 4  # fp32 gradient elements per bucket
    wire = assume.grad_reduce_bytes
    exposed = slowdown = 0.0
    for psi, group in ((dense, groups["dp"]), (expert, groups["expert_dp"])):
        if group.size <= 1 or psi <= 0:
            continue
        if lay.zero == 3:  # per layer: gather ahead of forward, gather + reduce-scatter in backward
            unit = psi / max(1, layers)
            gather = collective_seconds("all_gather", 2 * unit, group, cluster)
            reduce = collective_seconds("reduce_scatter", wire * unit, group, cluster)
            fwd, bwd = t_forward / max(1, layers), t_backward / max(1, layers)
            per_layer = max(0.0, gather - fwd) + max(0.0, gather + reduce - bwd)
            exposed += m * (layers * per_layer + gather)
            slowdown += m * layers * assume.overlap_slowdown * (min(gather, fwd) + min(gather + reduce, bwd))
            continue
        op = "all_reduce" if lay.zero == 0 else "reduce_scatter"
        grads, buckets, last = _bucketed(op, psi, wire, group, cluster, bucket)
        if lay.zero == 0 and assume.grad_fingerprint_sync:
            grads += buckets * 4 * assume.kernel_launch_s  # the host sync drains the queue, relaunch
        rounds = m if lay.zero == 2 else 1  # stage 2 reduces every microbatch's gradients
        if assume.grad_reduce_overlap:
            exposed += rounds * max(last, grads - t_backward)
            slowdown += rounds * assume.overlap_slowdown * min(grads, t_backward)
        else:
            exposed += rounds * grads
        if lay.zero in (1, 2):
            gather, _, last_gather = _bucketed("all_gather", psi, 2, group, cluster, bucket)
            if assume.param_gather_overlap or lay.overlap_param_gather:
                exposed += max(last_gather, gather - t_forward)
                slowdown += assume.overlap_slowdown * min(gather, t_forward)
            else:
                exposed += gather
    return exposed, slowdown


def estimate_step(cfg: ModelConfig, layout: Layout, cluster: Cluster, assume: Assumptions = Assumptions()) -> StepEstimate:
    """Predict one optimizer step of `layout` on `cluster` (see the module docstring for the scope).

    The busiest stage sets the pace: step = (m + (p-1)/v) * t_mb (bubble included) + exposed DP
    traffic + optimizer, times the straggler factor, where t_mb is that stage's time per
    microbatch over all its chunks (layers from parallel.pipeline's partition, p2p blocking; the
    first stage also embeds, the last runs the output layer and the loss).
    """
    if layout.recompute not in RECOMPUTE_MODES:
        raise PerfModelError(f"recompute={layout.recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    lay, m, pp, v = layout, layout.microbatches, layout.pp, layout.virtual_stages
    groups = placements(lay, cluster)
    per_layer = _layer_seconds(cfg, lay, cluster, assume, groups)
    x = ActivationShape.of(cfg, lay)
    p2p = 0.0
    if pp > 1:
        sent = x.dtype_bytes * x.h * x.residual_tokens
        if assume.pp_scatter_gather and not x.sequence_parallel:
            sent /= lay.tp
            p2p += 2 * v * collective_seconds("all_gather", sent * lay.tp, groups["tp"], cluster)
        p2p += 2 * v * collective_seconds("send_recv", sent, groups["pp"], cluster)
    stages = {}
    for r in sorted({0, pp - 1}):
        layers = sum(stage_layers(cfg, lay, r))
        dense, expert = stage_parameters(cfg, lay, layers, r == 0, r == pp - 1)
        extras = _extras_seconds(cfg, lay, cluster, assume, groups, r == 0, r == pp - 1, dense + expert)
        costs = {k: layers * per_layer[k] for k in ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm")}
        costs["compute"] += extras["compute"]
        costs["tp_comm"] += extras["tp_comm"]
        costs["pp_p2p"] = (1 - assume.pp_overlap) * p2p
        backward = layers * per_layer["backward"] + extras["backward"]
        stages[r] = (costs, backward, layers, dense, expert)
    busy = max(stages, key=lambda r: sum(stages[r][0].values()))
    costs, t_backward, layers, dense, expert = stages[busy]
    t_mb = sum(costs.values())
    times = {k: m * seconds for k, seconds in costs.items()}
    times["pp_bubble"] = pipeline_bubble_fraction(pp, m, v) * m * t_mb
    exposed, slowdown = _dp_seconds(lay, cluster, assume, groups, dense, expert, t_backward, t_mb - t_backward,
                                    layers)
    times["dp_comm"] = exposed
    times["compute"] += slowdown
    n_d, n_e = lay.dp * lay.cp, max(1, lay.dp * lay.cp // lay.ep)
    updated = dense / (n_d if lay.zero >= 1 else 1) + expert / (n_e if lay.zero >= 1 else 1)
    times["optimizer"] = (assume.optimizer_bytes_per_param + 4) * updated / (cluster.gpu.hbm_bandwidth * cluster.gpu.hbm_efficiency)
    base = sum(times.values())
    times["stragglers"] = base * assume.straggler_jitter * math.sqrt(2 * math.log(lay.world)) if lay.world > 1 else 0.0
    memory = peak_memory(cfg, lay, assume)
    step = sum(times.values())
    return StepEstimate(lay, times, step, lay.global_batch_size * cfg.seq_length / step,
                        flops_per_step(cfg, lay.global_batch_size) / (step * lay.world * cluster.gpu.peak_flops),
                        memory, memory.total <= cluster.gpu.hbm_bytes)

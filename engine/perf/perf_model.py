"""Analytical performance model of one training step at cluster scale: time, MFU, memory, traffic.

Modelled, per GPU of the busiest pipeline stage (formulas from shared/reference/perf-calibration.md):
- compute: model FLOPs from engine.train.metrics (Megatron's counter) plus recomputation, matmuls at an
  achievable fraction of the dense BF16 peak, flash attention at its own (lower) fraction, and the
  memory-bound element-wise work (norms, activations, residuals, softmax) as HBM traffic;
- communication as bytes over a link (NVLink inside a node, the NIC between nodes, at an achievable
  fraction of line rate, ring algorithms): TP/SP per layer per microbatch, the CP ring (hidden
  behind the attention it feeds), PP p2p and the (interleaved) 1F1B bubble, DP/ZeRO gradient and
  parameter traffic (partly hidden behind backward), MoE all-to-all;
- memory: ZeRO model states (Rajbhandari et al.), activations per Korthikanti et al. with the
  flash-attention simplification and the first stage's in-flight microbatches, the logits, a
  fixed reserve (CUDA context, NCCL buffers, fragmentation).

Not modelled: kernel launch and host overheads, stragglers and network congestion, load imbalance
between experts, GEMM efficiency that changes with shape, NCCL protocol choice, power throttling,
fp8, CPU offload, checkpoint and data-loading stalls. The model is untested against real GPU runs
on this machine (it has no GPU); it is checked only against published tables in
tests/test_perf_model.py.
"""
from __future__ import annotations

from typing import Optional
from dataclasses import dataclass

from engine.config import ModelConfig
from engine.train.metrics import GPU_BF16_PEAK_TFLOPS, flops_per_step, flops_per_token_breakdown
from parallel.pipeline import partition_layers

from parallel.layout import ParallelLayout

GIB = 2**30
"""Bytes in a GiB (memory is reported in GiB)."""

_DATASHEETS = (
    # name, HBM bytes, HBM B/s, NVLink B/s per GPU per direction, NIC B/s per GPU, matmul and
    # attention efficiency. Data-sheet figures (SXM parts; one 200 Gb/s HDR NIC per A100, one
    # 400 Gb/s NIC per later GPU, as in DGX/HGX nodes). Efficiencies are public microbenchmark
    # levels, not fits: large bf16 cuBLAS GEMMs reach ~75-80% of peak on A100 and ~70% on
    # H100-class parts (power-limited); flash-attention forward+backward ~55% on A100 (FA2) and
    # ~50% on H100 (between FA2 and FA3). B200 is assumed to behave like H100.
    ("A100", 80e9, 2.039e12, 300e9, 25e9, 0.75, 0.55),
    ("H100", 80e9, 3.35e12, 450e9, 50e9, 0.70, 0.50),
    ("H200", 141e9, 4.8e12, 450e9, 50e9, 0.70, 0.50),
    ("B200", 180e9, 8.0e12, 900e9, 50e9, 0.70, 0.50),
)


class PerfModelError(ValueError):
    """An input the model cannot use; the message names the field, the value and what is valid."""


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: dense BF16 peak, HBM and the fractions of peak real kernels reach."""

    name: str
    """Type, a key of engine.train.metrics.GPU_BF16_PEAK_TFLOPS."""
    peak_flops: float
    """Dense BF16 FLOP/s (not the 2:4-sparse figure)."""
    hbm_bytes: float
    """Device memory in bytes."""
    hbm_bandwidth: float
    """Device memory bandwidth in bytes/s."""
    matmul_efficiency: float
    """Achievable fraction of peak for the GEMMs of a training step."""
    attention_efficiency: float
    """Achievable fraction of peak for flash attention (forward + backward)."""


@dataclass(frozen=True)
class Cluster:
    """GPUs in nodes: NVLink inside a node, one NIC per GPU between nodes."""

    gpu: GPUSpec
    """The GPU type of every rank."""
    gpus_per_node: int
    """GPUs sharing one NVLink domain."""
    intra_node_bandwidth: float
    """NVLink bytes/s per GPU per direction."""
    inter_node_bandwidth: float
    """Network bytes/s per GPU per direction (InfiniBand/RoCE)."""
    link_efficiency: float = 0.8
    """Fraction of line rate NCCL reaches for large messages (bus bandwidth / link bandwidth)."""

    def bandwidth(self, span: int) -> float:
        """Achievable bytes/s of a group whose members lie within `span` consecutive ranks."""
        link = self.intra_node_bandwidth if span <= self.gpus_per_node else self.inter_node_bandwidth
        return self.link_efficiency * link


def known_gpus() -> tuple[str, ...]:
    """GPU types the model has data sheets for."""
    return tuple(row[0] for row in _DATASHEETS if row[0] in GPU_BF16_PEAK_TFLOPS)


def make_cluster(gpu: str, gpus_per_node: int = 8) -> Cluster:
    """The Cluster of `gpu` nodes from the data sheets; PerfModelError names a bad gpu or node size."""
    rows, key = {row[0]: row for row in _DATASHEETS}, gpu.upper()
    if key not in known_gpus():
        raise PerfModelError(f"gpu={gpu!r}: unknown GPU type; valid: {', '.join(known_gpus())}")
    if gpus_per_node < 1:
        raise PerfModelError(f"gpus_per_node={gpus_per_node}: must be >= 1")
    _, hbm, hbm_bw, nvlink, nic, matmul, attention = rows[key]
    spec = GPUSpec(key, GPU_BF16_PEAK_TFLOPS[key] * 1e12, hbm, hbm_bw, matmul, attention)
    return Cluster(spec, gpus_per_node, nvlink, nic)


@dataclass
class Layout(ParallelLayout):
    """A parallel layout (the engine's own type, parallel/layout.py) with the batch shape and the
    recomputation that the model prices; rank order tp-cp-ep-dp-pp (tp fastest), as the engine."""

    dp: Optional[int] = 1
    """Data-parallel size."""
    micro_batch_size: int = 1
    """Samples per microbatch per data-parallel rank."""
    global_batch_size: int = 1
    """Samples per optimizer step."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (whole layer)."""

    @property
    def world(self) -> int:
        """GPUs used: tp * cp * dp * pp."""
        return self.world_size

    @property
    def microbatches(self) -> int:
        """Microbatches per step per data-parallel rank, m = B / (b * dp); PerfModelError if not whole."""
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise PerfModelError(f"global_batch_size={self.global_batch_size}: must be a multiple of "
                                 f"micro_batch_size*dp = {self.micro_batch_size}*{self.dp}")
        return self.global_batch_size // (self.micro_batch_size * self.dp)


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the model that are not hardware: software behaviour, stated once, with defaults."""

    flash_attention: bool = True
    """Attention scores never reach HBM and masked causal blocks are skipped; False models 2021-era
    Megatron: full (unmasked-cost) attention matmuls plus softmax traffic of the 5*a*s^2*b scores."""
    tp_overlap: float = 0.0
    """Fraction of TP/SP communication hidden behind GEMMs (0: exposed, the engine does not overlap)."""
    pp_overlap: float = 0.0
    """Fraction of PP p2p time hidden behind compute (0: blocking sends, as the engine's schedules)."""
    dp_overlap: float = 0.8
    """Fraction of the overlap window (the backward that produces the gradients) that really hides
    DP/ZeRO traffic; below 1 because communication kernels slow the compute they run beside."""
    grad_bytes: int = 4
    """Bytes per gradient element, stored and reduced (the engine keeps fp32 main grads; 2 gives
    the ZeRO paper's fp16 accounting)."""
    elementwise_passes: float = 6.0
    """HBM traffic of the memory-bound ops per layer, in multiples of the layer's stored activation
    bytes: each activation written and read once forward (2), twice that backward (4)."""
    optimizer_bytes_per_param: float = 30.0
    """HBM bytes per locally updated parameter in Adam (read fp32 master, m, v, grad; write them
    and the bf16 copy)."""
    reserved_bytes: float = 3 * GIB
    """Memory lost to the CUDA context, NCCL buffers and allocator fragmentation."""


# ---------------------------------------------------------------------------------------------
# Formulas (each reproducible by hand; tests check them), then one step built from them


def pipeline_bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle time over ideal time: (p-1)/m for 1F1B, (1/v)(p-1)/m interleaved (Narayanan et al. 2021)."""
    return (pp - 1) / (virtual_stages * microbatches)


def tp_comm_bytes(b: int, s: int, h: int, tp: int, recompute: str = "none", dtype_bytes: int = 2) -> float:
    """Bytes one device sends for TP (or SP) per layer per microbatch: 8*b*s*h*(t-1)/t elements
    (two all-reduces forward, two backward; SP's all-gather + reduce-scatter pairs move the same);
    full recomputation repeats the forward pair (12 instead of 8)."""
    elements = (12 if recompute == "full" else 8) * b * s * h * (tp - 1) / tp
    return elements * dtype_bytes


def cp_ring_bytes(b: int, s_local: int, kv_width: int, cp: int, dtype_bytes: int = 2) -> float:
    """Bytes one device sends for ring attention per layer per microbatch: K and V of its chunk
    (b * s_local * kv_width each) pass cp-1 hops forward; backward sends K, V and dK, dV (x2)."""
    return 3 * (cp - 1) * 2 * b * s_local * kv_width * dtype_bytes


def ep_all_to_all_bytes(tokens: int, topk: int, h: int, ep: int, recompute: str = "none", dtype_bytes: int = 2) -> float:
    """Bytes one device sends for MoE per layer per microbatch: dispatch and combine all-to-alls
    forward and backward (4; 6 with full recomputation), each moving tokens*topk*h*(ep-1)/ep."""
    count = 6 if recompute == "full" else 4
    return count * tokens * topk * h * (ep - 1) / ep * dtype_bytes


def dp_traffic_elements(psi: float, zero: int, microbatches: int = 1) -> dict:
    """Elements each DP rank moves per step, as the engine does it: plain DP all-reduces the grads
    and stage 1 reduce-scatters them then all-gathers the params (2 Psi, the paper's figure); stage 2
    reduce-scatters every microbatch ((m+1) Psi, parallel/zero.py); stage 3 gathers params twice and
    reduce-scatters grads every microbatch (3 m Psi, parallel/zero3.py). At m = 1: 2, 2, 2, 3 Psi."""
    m = microbatches
    grads = {0: 2 * psi, 1: psi, 2: m * psi, 3: m * psi}[zero]
    params = {0: 0.0, 1: psi, 2: psi, 3: 2 * m * psi}[zero]
    return {"grads": grads, "params": params}


def model_state_bytes(psi: float, n_d: int, zero: int, grad_bytes: int = 2) -> dict:
    """Parameters, gradients and Adam state per GPU for Psi parameters over N_d ranks (ZeRO, K=12):
    with grad_bytes=2, plain DP is 16 Psi; stage 1 4 Psi + 12 Psi/N_d; stage 2 2 Psi + 14 Psi/N_d;
    stage 3 16 Psi/N_d (Rajbhandari et al. 2019)."""
    return {"params": 2 * psi / (n_d if zero >= 3 else 1),
            "grads": grad_bytes * psi / (n_d if zero >= 2 else 1),
            "optimizer": 12 * psi / (n_d if zero >= 1 else 1)}


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, tp: int, sequence_parallel: bool,
                               recompute: str, flash_attention: bool = True) -> float:
    """Activation bytes one layer keeps per microbatch, 16-bit (Korthikanti et al. 2022): TP
    s*b*h*(10 + 24/t + 5*a*s/(h*t)); TP+SP (s*b*h/t)*(34 + 5*a*s/h); selective recomputation drops
    the 5*a*s/h score term (as flash attention does); full recomputation keeps the layer input,
    2*s*b*h (divided by t under SP, which stores it sharded). GPT's constants are used for Llama
    layers (SwiGLU keeps a little more, no dropout a little less)."""
    scores = 0.0 if (flash_attention or recompute == "selective") else 5 * a * s / h
    if recompute == "full":
        return 2 * s * b * h / (tp if sequence_parallel else 1)
    if sequence_parallel:
        return s * b * h / tp * (34 + scores)
    return s * b * h * (10 + 24 / tp + scores / tp)


def in_flight_microbatches(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Microbatches' activations the first stage holds: p in 1F1B (fewer if m < p); interleaved,
    p * (1 + (p-1)/(p*m)) (Korthikanti et al. 2022)."""
    if virtual_stages > 1:
        return pp * (1 + (pp - 1) / (pp * microbatches))
    return min(pp, microbatches)


def stage_parameters(cfg: ModelConfig, layout: Layout, layers: int, first: bool, last: bool) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of a stage with `layers` layers holds: dense weights over
    tp (norms too, a negligible simplification), experts over ep, the embedding on the first stage
    and the output layer on the last (once when tied on a single stage)."""
    h, q, kv = cfg.hidden_size, cfg.head_dim * cfg.num_heads, cfg.head_dim * cfg.num_kv_heads
    dense = h * (2 * q + 2 * kv) + 2 * h + (h * cfg.num_experts if cfg.num_experts else 3 * h * cfg.ffn_hidden_size)
    expert = cfg.num_experts * 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    embeddings = (first + last - (first and last and cfg.tie_embeddings)) * cfg.vocab_size * h + last * h
    return (layers * dense + embeddings) / layout.tp, layers * expert / layout.ep


@dataclass
class MemoryEstimate:
    """Peak bytes per GPU on the fullest pipeline stage, by kind."""

    params: float
    """bf16 weights (with ZeRO-3: the shard plus two gathered layers)."""
    grads: float
    """Gradient buffers."""
    optimizer: float
    """fp32 master weights and Adam moments."""
    activations: float
    """Saved activations of the in-flight microbatches, plus the logits on the last stage."""
    reserved: float
    """CUDA context, NCCL buffers, fragmentation (Assumptions.reserved_bytes)."""

    @property
    def total(self) -> float:
        """Sum of all kinds, in bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.reserved


@dataclass
class StepEstimate:
    """Predicted step of one layout: seconds per cost (they add up to step_time), throughput, memory."""

    layout: Layout
    """The layout estimated."""
    times: dict
    """Seconds each cost adds to the step: compute, recompute, tp_comm, cp_comm, ep_comm,
    pp_bubble, pp_p2p, dp_comm (exposed part), optimizer."""
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


def _microbatch_costs(cfg: ModelConfig, lay: Layout, cluster: Cluster, assume: Assumptions) -> dict:
    """Seconds per layer per microbatch on one GPU, by cost; 'head' is the output layer and loss."""
    gpu, t, b, h = cluster.gpu, lay.tp, lay.micro_batch_size, cfg.hidden_size
    s_local = cfg.seq_length // lay.cp
    tokens = b * s_local
    per_token = flops_per_token_breakdown(cfg)
    proj, core, mlp = (per_token[k] / cfg.num_layers for k in ("attention_projections", "attention_core", "mlp"))
    gemm_rate, attn_rate = gpu.peak_flops * gpu.matmul_efficiency, gpu.peak_flops * gpu.attention_efficiency
    if not assume.flash_attention:  # batched GEMMs over the whole (masked) score matrix; the
        core, attn_rate = 2 * core, gemm_rate  # softmax is in the element-wise traffic
    gemm_time = tokens * (proj + mlp) / t / gemm_rate
    attn_time = tokens * core / t / attn_rate
    act = activation_bytes_per_layer(s_local, b, h, cfg.num_heads, t, lay.sequence_parallel, "none", assume.flash_attention)
    elementwise = assume.elementwise_passes * act / gpu.hbm_bandwidth
    recompute = {"none": 0.0, "selective": attn_time / 3,
                 "full": (gemm_time + attn_time + elementwise) / 3}[lay.recompute]
    tp = (1 - assume.tp_overlap) * tp_comm_bytes(b, s_local, h, t, lay.recompute) / cluster.bandwidth(t)
    kv_width = cfg.head_dim * cfg.num_kv_heads // t
    cp_send = cp_ring_bytes(b, s_local, kv_width, lay.cp) / cluster.bandwidth(t * lay.cp) if lay.cp > 1 else 0.0
    cp = max(0.0, cp_send - attn_time)  # the ring overlaps each block's transfer with its attention
    ep = ep_all_to_all_bytes(tokens, cfg.moe_topk, h, lay.ep, lay.recompute) / cluster.bandwidth(t * lay.ep) \
        if cfg.num_experts else 0.0
    head = tokens * per_token["logits"] / t / gemm_rate
    head += 12 * tokens * cfg.vocab_size / t / gpu.hbm_bandwidth  # fp32 softmax cross-entropy, fwd + bwd
    return {"compute": gemm_time + attn_time + elementwise, "recompute": recompute, "tp_comm": tp,
            "cp_comm": cp, "ep_comm": ep, "head": head}


def estimate_step(cfg: ModelConfig, layout: Layout, cluster: Cluster, assume: Assumptions = Assumptions()) -> StepEstimate:
    """Predict one optimizer step of `layout` on `cluster` (see the module docstring for the scope).

    The busiest stage sets the pace: step = m * t_mb + (p-1)/v * t_mb (bubble) + p2p + exposed DP
    traffic + optimizer, where t_mb is its time per microbatch (layers from parallel.pipeline's
    partition; the last stage also runs the output layer and the loss).
    """
    lay, m, pp, v = layout, layout.microbatches, layout.pp, layout.virtual_stages
    per_layer = _microbatch_costs(cfg, lay, cluster, assume)
    chunks = partition_layers(cfg.num_layers, pp, v)
    counts = {r: sum(len(chunks[c * pp + r]) for c in range(v)) for r in {0, pp - 1}}  # 0 has the most
    layer_time = sum(val for k, val in per_layer.items() if k != "head")
    stage_time = {r: n * layer_time + per_layer["head"] * (r == pp - 1) for r, n in counts.items()}
    busy = max(stage_time, key=stage_time.get)
    t_mb = stage_time[busy]
    times = {k: m * counts[busy] * per_layer[k] for k in ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm")}
    times["compute"] += m * per_layer["head"] * (busy == pp - 1)
    times["pp_bubble"] = pipeline_bubble_fraction(pp, m, v) * m * t_mb
    s_local, h = cfg.seq_length // lay.cp, cfg.hidden_size
    p2p_bytes = 2 * lay.micro_batch_size * s_local * h / lay.tp  # Megatron's scatter/gather: 1/t per rank
    p2p_time = 2 * v * m * p2p_bytes / cluster.bandwidth(lay.world) if pp > 1 else 0.0
    times["pp_p2p"] = (1 - assume.pp_overlap) * p2p_time
    dense, expert = stage_parameters(cfg, lay, counts[busy], busy == 0, busy == pp - 1)
    n_d, n_e = lay.dp * lay.cp, max(1, lay.dp * lay.cp // lay.ep)
    traffic = 0.0
    for psi, n in ((dense, n_d), (expert, n_e)):
        if n > 1:
            moved = dp_traffic_elements(psi, lay.zero, m)
            traffic += (moved["grads"] * assume.grad_bytes + moved["params"] * 2) * (n - 1) / n
    dp_time = traffic / cluster.bandwidth(lay.tp * lay.cp * lay.dp)
    # Overlap window: plain DP reduces during the last backward; stage 1 also gathers parameters
    # beside the next first forward; stages 2-3 move data during every microbatch.
    backward_share = 3 / 4 if lay.recompute == "full" else 2 / 3
    window = t_mb * (backward_share if lay.zero == 0 else 1) * (m if lay.zero >= 2 else 1)
    times["dp_comm"] = max(0.0, dp_time - assume.dp_overlap * window)
    updated = dense / (n_d if lay.zero >= 1 else 1) + expert / (n_e if lay.zero >= 1 else 1)
    times["optimizer"] = assume.optimizer_bytes_per_param * updated / cluster.gpu.hbm_bandwidth

    memory = max((_stage_memory(cfg, lay, assume, counts[r], r) for r in {0, pp - 1}), key=lambda e: e.total)
    step = sum(times.values())
    return StepEstimate(lay, times, step, lay.global_batch_size * cfg.seq_length / step,
                        flops_per_step(cfg, lay.global_batch_size) / (step * lay.world * cluster.gpu.peak_flops),
                        memory, memory.total <= cluster.gpu.hbm_bytes)


def _stage_memory(cfg: ModelConfig, lay: Layout, assume: Assumptions, layers: int, stage: int) -> MemoryEstimate:
    """Peak bytes per GPU of pipeline stage `stage` (the first holds most microbatches, the last logits)."""
    first, last = stage == 0, stage == lay.pp - 1
    dense, expert = stage_parameters(cfg, lay, layers, first, last)
    n_d, n_e = lay.dp * lay.cp, max(1, lay.dp * lay.cp // lay.ep)
    states = [model_state_bytes(dense, n_d, lay.zero, assume.grad_bytes),
              model_state_bytes(expert, n_e, lay.zero, assume.grad_bytes)]
    params, grads, optimizer = (sum(s[k] for s in states) for k in ("params", "grads", "optimizer"))
    if lay.zero >= 3:  # the layer in use and the one prefetched, gathered in bf16
        layer_dense, layer_expert = stage_parameters(cfg, lay, 1, False, False)
        params += 2 * 2 * (layer_dense + layer_expert)
    s_local, b, h, t = cfg.seq_length // lay.cp, lay.micro_batch_size, cfg.hidden_size, lay.tp
    per_layer, unsaved = (activation_bytes_per_layer(s_local, b, h, cfg.num_heads, t, lay.sequence_parallel,
                                                     mode, assume.flash_attention) for mode in (lay.recompute, "none"))
    m, p, v = lay.microbatches, lay.pp, lay.virtual_stages
    # Later stages: Megatron's warm-up, (p-r-1)*2 + (v-1)*p chunk-forwards before the first backward.
    held = in_flight_microbatches(p, m, v) if first else \
        min(((p - stage - 1) * 2 + (v - 1) * p + 1) / v, m) if v > 1 else min(p - stage, m)
    activations = per_layer * layers * held
    activations += unsaved * (lay.recompute == "full")  # one layer's, live while it is recomputed
    if last:
        activations += 4 * b * s_local * cfg.vocab_size / t  # fp32 log-softmax kept for the loss
    return MemoryEstimate(params, grads, optimizer, activations, assume.reserved_bytes)

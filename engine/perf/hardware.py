"""GPUs and clusters as the performance model sees them: data-sheet rates and the fractions of them
real kernels and collectives reach.

Every figure is a data-sheet value or a public microbenchmark level, not a fit to the published
training tables (engine/perf/calibration.py reports the model's error on those):
- peaks: dense BF16 and FP32 (CUDA cores, no tensor cores) FLOP/s, HBM bytes and bandwidth,
  NVLink bandwidth per GPU per direction, one NIC per GPU (DGX/HGX nodes: 200 Gb/s HDR per A100,
  400 Gb/s NDR per later GPU);
- efficiencies: large bf16 cuBLAS GEMMs reach ~78% of peak on A100 and ~68% on H100-class parts
  (power-limited at 700 W); PyTorch SDPA's flash kernels (FlashAttention-2) forward+backward
  ~55% on A100 and ~30% on H100 (FA2 is not Hopper-tuned: ~335 TFLOP/s forward, less backward); streaming element-wise kernels ~85% of
  HBM bandwidth; FP32 SGEMM ~85% of the FP32 peak; NCCL bus bandwidth ~80% of line rate.
- the network: rail-optimised fat trees where one leaf tier joins a scalable unit of 32 nodes
  (DGX SuperPOD's SU); traffic that crosses the spine, and at larger sizes the core, meets ECMP
  collisions and oversubscription, which cost bandwidth (tier_efficiency).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.perf.inputs import PerfModelError
from engine.train.metrics import GPU_BF16_PEAK_TFLOPS

_DATASHEETS = (
    # name, HBM bytes, HBM B/s, NVLink B/s per GPU per direction, NIC B/s per GPU, FP32 FLOP/s,
    # GEMM efficiency, flash-attention efficiency (see the module docstring).
    ("A100", 80e9, 2.039e12, 300e9, 25e9, 19.5e12, 0.78, 0.55),
    ("H100", 80e9, 3.35e12, 450e9, 50e9, 67e12, 0.68, 0.30),
    ("H200", 141e9, 4.8e12, 450e9, 50e9, 67e12, 0.70, 0.32),
    ("B200", 180e9, 8.0e12, 900e9, 50e9, 75e12, 0.65, 0.30),
)

NODES_PER_LEAF = 32
"""Nodes one leaf tier of a rail-optimised fabric joins without crossing the spine (one SU)."""

LEAVES_PER_SPINE = 16
"""Scalable units one spine tier joins (512 nodes, 4096 GPUs) before traffic crosses the core."""


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: peaks and the fractions of peak real kernels reach."""

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
    fp32_flops: float = 67e12
    """FP32 FLOP/s on CUDA cores (fp32 matmuls without TF32, as torch runs them by default)."""
    hbm_efficiency: float = 0.85
    """Achievable fraction of HBM bandwidth for streaming element-wise kernels."""
    fp32_efficiency: float = 0.85
    """Achievable fraction of the FP32 peak for SGEMM."""


@dataclass(frozen=True)
class Cluster:
    """GPUs in nodes: NVLink inside a node, one NIC per GPU between nodes, a leaf/spine/core fabric."""

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
    nvlink_latency_s: float = 3.4e-6
    """Latency of one ring step inside a node (NCCL's tuning model, src/graph/tuning.cc: hwLat of
    a Ring/Simple NVLink step; large messages use the Simple protocol)."""
    network_latency_s: float = 9.6e-6
    """Latency of one ring step that crosses the network (NCCL's hwLat, Ring/Simple, NET)."""
    tree_hop_latency_s: float = 28e-6
    """Latency of one tree hop with the Simple protocol (NCCL's hwLat, Tree/Simple: one 256 kB chunk)."""
    collective_launch_s: float = 8.4e-6
    """Fixed cost of one collective (NCCL's baseLat, Ring/Simple)."""
    tier_efficiency: tuple = (1.0, 0.9, 0.8)
    """Fraction of the NIC bandwidth left to a collective whose nodes span one leaf, the spine,
    the core (ECMP collisions and oversubscription grow with the tiers crossed)."""

    def bandwidth(self, span: int) -> float:
        """Achievable bytes/s of one link of a group whose members lie within `span` consecutive ranks."""
        if span <= self.gpus_per_node:
            return self.link_efficiency * self.intra_node_bandwidth
        return self.link_efficiency * self.inter_node_bandwidth * self.tier(math.ceil(span / self.gpus_per_node))

    def tier(self, nodes: int) -> float:
        """tier_efficiency of traffic among `nodes` nodes (placed contiguously)."""
        if nodes <= NODES_PER_LEAF:
            return self.tier_efficiency[0]
        return self.tier_efficiency[1] if nodes <= NODES_PER_LEAF * LEAVES_PER_SPINE else self.tier_efficiency[2]


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
    _, hbm, hbm_bw, nvlink, nic, fp32, matmul, attention = rows[key]
    spec = GPUSpec(key, GPU_BF16_PEAK_TFLOPS[key] * 1e12, hbm, hbm_bw, matmul, attention, fp32_flops=fp32)
    return Cluster(spec, gpus_per_node, nvlink, nic)

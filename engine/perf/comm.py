"""Communication in the performance model: how a process group lies on the nodes, what one
collective costs on it, and how many bytes each kind of parallelism moves.

A group's placement follows the engine's rank order 'tp-cp-ep-dp-pp' (tp fastest): a group of n
members whose ranks are `stride` apart has min(n, gpus_per_node // stride) members in each node
(one per node when the stride is a node or more). Every group of a kind runs its collective at
the same moment (all TP groups, all DP groups), and each GPU has its own NIC (rail-optimised
nodes), so groups do not share a NIC.

One collective of S bytes (the full buffer: what an all-reduce reduces, a reduce-scatter reads, an
all-gather writes) on n ranks costs a bandwidth term and a latency term (alpha-beta):
- bandwidth: NCCL's ring moves 2(n-1)/n S per rank for an all-reduce, (n-1)/n S for a
  reduce-scatter or all-gather, at the group's bus bandwidth: NVLink inside a node; across nodes
  the bottleneck of the hierarchical ring, min(NVLink, members per node x NIC), times the fabric
  tier's efficiency (hardware.Cluster.tier over the nodes the group reaches: congestion grows
  with the switch tiers crossed);
- latency, NCCL's own tuning model (src/graph/tuning.cc): a base cost plus one step latency per
  ring step (2(n-1) or n-1 steps), of which 2(nodes-1) (all-reduce) or nodes-1 cross the network
  at the network's step latency, the rest at NVLink's. For an all-reduce across nodes NCCL may
  take its double binary tree instead: 2 ((members per node - 1) + log2(nodes)) tree hops, at 90%
  of the ring's bandwidth; the faster of the two is taken. So a reduce-scatter over 128 nodes
  with one member per node pays ~1.2 ms of latency whatever its size: with the engine's 25 MiB
  buckets that is what makes large data-parallel groups slow.
All-to-all sends (n-1)/n S per rank, the part leaving the node over that GPU's NIC; a p2p
exchange sends S each way over the link between the two ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.perf.hardware import Cluster


@dataclass(frozen=True)
class Placement:
    """A process group on the nodes: members, members per node, nodes spanned."""

    size: int
    """Members."""
    per_node: int
    """Members sharing one node (NVLink domain)."""
    nodes: int
    """Nodes holding members."""
    span_nodes: int = 0
    """Nodes from the first member's to the last's (the fabric tiers its traffic crosses); 0: nodes."""

    @property
    def reach(self) -> int:
        """Nodes whose fabric the group's traffic crosses (hardware.Cluster.tier)."""
        return max(self.nodes, self.span_nodes)


def place(size: int, stride: int, gpus_per_node: int) -> Placement:
    """Placement of a group of `size` ranks `stride` apart (the engine's rank order)."""
    stride = max(1, stride)
    per_node = max(1, min(size, gpus_per_node // stride))
    span = math.ceil(((size - 1) * stride + 1) / gpus_per_node)
    return Placement(size, per_node, math.ceil(size / per_node), span)


def bus_bandwidth(group: Placement, cluster: Cluster) -> float:
    """Bytes/s one member of `group` reaches in a ring collective (the hierarchical ring's bottleneck)."""
    nvlink = cluster.link_efficiency * cluster.intra_node_bandwidth
    if group.nodes == 1:
        return nvlink
    network = cluster.link_efficiency * group.per_node * cluster.inter_node_bandwidth * cluster.tier(group.reach)
    return min(nvlink, network)


def _step_latency(group: Placement, cluster: Cluster) -> float:
    return cluster.network_latency_s if group.nodes > 1 else cluster.nvlink_latency_s


def _ring_latency(op: str, group: Placement, cluster: Cluster) -> float:
    steps = 2 * (group.size - 1) if op == "all_reduce" else group.size - 1
    inter = 0 if group.nodes == 1 else (2 if op == "all_reduce" else 1) * (group.nodes - 1)
    return cluster.collective_launch_s + (steps - inter) * cluster.nvlink_latency_s + inter * cluster.network_latency_s


def collective_seconds(op: str, nbytes: float, group: Placement, cluster: Cluster) -> float:
    """Seconds of one collective `op` over `group` of an `nbytes` buffer (see the module docstring).

    op: all_reduce, reduce_scatter, all_gather, all_to_all or send_recv (one exchange with a peer:
    the group is then the pair, and the bytes go each way).
    """
    n = group.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    nic = cluster.link_efficiency * cluster.inter_node_bandwidth * cluster.tier(group.reach)
    nvlink = cluster.link_efficiency * cluster.intra_node_bandwidth
    if op == "send_recv":
        return cluster.collective_launch_s + _step_latency(group, cluster) + nbytes / (nic if group.nodes > 1 else nvlink)
    if op == "all_to_all":  # every peer at once: a couple of step latencies, the NIC or NVLink bound
        leaving, inside = (n - group.per_node) / n * nbytes, (group.per_node - 1) / n * nbytes
        return cluster.collective_launch_s + 2 * _step_latency(group, cluster) + max(leaving / nic, inside / nvlink)
    if op not in ("all_reduce", "reduce_scatter", "all_gather"):
        raise ValueError(f"collective op {op!r}: expected all_reduce, reduce_scatter, all_gather, all_to_all or send_recv")
    moved = (2 * (n - 1) if op == "all_reduce" else n - 1) / n * nbytes
    ring = _ring_latency(op, group, cluster) + moved / bus_bandwidth(group, cluster)
    if op != "all_reduce" or group.nodes == 1:
        return ring
    hops = group.per_node - 1 + math.ceil(math.log2(group.nodes))
    tree = cluster.collective_launch_s + 2 * hops * cluster.tree_hop_latency_s + moved / (0.9 * bus_bandwidth(group, cluster))
    return min(ring, tree)


def collective_latency_seconds(op: str, group: Placement, cluster: Cluster) -> float:
    """The size-independent part of `collective_seconds` (what one more, smaller message costs)."""
    return collective_seconds(op, 1e-9, group, cluster)


# ---------------------------------------------------------------------------------------------
# Bytes each kind of parallelism moves (per GPU; each reproducible by hand, tests check them)


def tp_comm_bytes(b: int, s: int, h: int, tp: int, recompute: str = "none", dtype_bytes: int = 2) -> float:
    """Bytes one device sends for TP (or SP) per layer per microbatch: 8*b*s*h*(t-1)/t elements
    (two all-reduces forward, two backward; SP's all-gather + reduce-scatter pairs move the same);
    full recomputation repeats the forward pair (12 instead of 8)."""
    elements = (12 if recompute == "full" else 8) * b * s * h * (tp - 1) / tp
    return elements * dtype_bytes


def cp_ring_bytes(b: int, s_local: int, kv_width: int, cp: int, dtype_bytes: int = 2) -> float:
    """Bytes one device sends for ring attention per layer per microbatch, as
    parallel/context_parallel.py books them: K and V of its chunk (b * s_local * kv_width each)
    pass cp-1 hops forward and again backward, and the fp32 dK/dV accumulators (twice the bytes
    of bf16 K/V) travel cp-1 hops backward: (cp-1) * 2 * B_kv * (1 + 1 + 2)."""
    b_kv = b * s_local * kv_width * dtype_bytes
    return (cp - 1) * 2 * b_kv * (2 + max(4, dtype_bytes) / dtype_bytes)


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

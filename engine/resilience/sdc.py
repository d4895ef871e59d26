"""Silent-data-corruption detection: exact fingerprints, cross-replica comparison, attribution.

A fingerprint is the integer sum of a tensor's bit patterns (fp32 viewed as int32, bf16 as int16,
summed in int64). Integer addition is associative, so it does not depend on summation order, and
any single flipped bit changes it (by +-2^b): it is exact where a float checksum would not be.

Two checks use them:
- Cross-replica: data-parallel replicas must hold bitwise-identical parameters after every
  optimizer step (and identical reduced gradients). Every `check_interval` steps the replicas
  all-gather their fingerprints; a rank that disagrees with the majority is named. With two
  replicas there is no majority: both are suspects until a replay settles it.
- Replay: a step is a pure function of (state, step), so running it again must reproduce every
  result bit for bit. Where each rank's replay first diverges from its original names the faulty
  rank (engine/resilience/divergence.py); if every rank reproduces, the anomaly is real
  arithmetic (a bad batch, a genuine spike) and no rank is blamed. This is the distinction
  Megatron's rerun state machine makes.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
import torch.distributed as dist

from parallel.collectives import Group, all_gather_values

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


def fingerprint_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Exact, order-independent fingerprint of a tensor's bits, as an int64 scalar on its device.

    The bytes are read as 64-bit words and summed with wrap-around (14x faster than widening
    each fp32 element to int64 first: 13 ms instead of 181 ms for 58M elements here); a flipped
    bit b changes its word by +-2^b, which no wrap-around can cancel. It stays on the device:
    reading it (`int()`) waits for the GPU, so a step's fingerprints are read together, once.
    """
    flat = tensor.detach().contiguous().view(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and (flat.data_ptr() % 8) == 0:
        return flat.view(torch.int64).sum()
    if flat.dtype in _INT_VIEW:
        return flat.view(_INT_VIEW[flat.dtype]).sum(dtype=torch.int64)
    return flat.view(torch.uint8).sum(dtype=torch.int64)  # integer and bool tensors: their bytes


def fingerprint(tensor: torch.Tensor) -> int:
    """`fingerprint_tensor` read as a Python int."""
    return int(fingerprint_tensor(tensor))


def fingerprint_all(tensors: Iterable[torch.Tensor]) -> int:
    """Fingerprint of several tensors (wrapping 64-bit sum of their fingerprints, signed)."""
    total = 0
    for t in tensors:
        total = (total + fingerprint(t)) & 0xFFFFFFFFFFFFFFFF
    return total - (1 << 64) if total >= 1 << 63 else total  # as a signed int64, for collectives


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


def fingerprint_all_tensor(tensors: Iterable[torch.Tensor], device=None) -> torch.Tensor:
    """`fingerprint_all` as a 0-dim int64 tensor on the device, with no host sync (int64 sums wrap
    the same way; `int()` of it equals `fingerprint_all`)."""
    parts = [fingerprint_tensor(t) for t in tensors]
    if not parts:
        return torch.zeros((), dtype=torch.int64, device=device)
    return torch.stack(parts).sum()


def replicas_disagree(local: list[int], group: Group) -> tuple[list[int], list[list[int]]]:
    """Compare `local` across the replicas of `group`; returns (global ranks that differ, all values)."""
    values = all_gather_values(local, group)
    ranks = dist.get_process_group_ranks(group.process_group) if group.size > 1 else [0]
    return [ranks[i] for i in odd_ones_out(values)], values

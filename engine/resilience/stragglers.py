"""Stragglers: per-rank compute and wait times per step; a rank persistently slower than its peers
is named in a 'straggler' event.

Each step, every rank measures its compute time and its wait time. The wait is the host time spent
blocked in collectives (the comm ledger books it: a blocking call's whole time, an async one's
`wait()`), the compute the rest of the step. A slow rank computes longer and waits less, its
peers wait for it; compute times compare ranks that do the same work, wait times do not (the fast
ones absorb the slow one's delay). On CUDA the host does not block in collectives (NCCL runs them
on the GPU), so the compute time is the GPU's, from CUDA events around the step's forward and
backward, read one step later when they are complete (`query()`: never a host sync).

After each step the ranks exchange their (compute, wait) microseconds, one all-gather of two
int64 per rank over the world group, beside the loss the step already brought to the host. A
rank's slowdown is its compute time over the median of its peers'; a rank whose slowdown exceeded
`resilience.straggler_factor` on each of the last WINDOW steps is a straggler (a rank descheduled
for a step or two on a shared host is not; its slowdown is the window's median): rank 0
records one 'straggler' event (slow_rank, slowdown) when it becomes one, and again only after it
has recovered and slowed down again. The per-rank times and the largest slowdown go to
metrics.jsonl and TensorBoard (compute-time, wait-time, straggler-slowdown).
"""
from __future__ import annotations

import statistics
import sys
from collections import deque
from typing import Optional

import torch

from parallel.collectives import all_gather_values

WINDOW = 5  # steps a slowdown must persist (as a median) before the rank is named


class StepTimer:
    """Compute time of this rank's steps on CUDA, from events read once they are complete."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: Optional[tuple] = None
        self.last_gpu_s: Optional[float] = None

    def start(self) -> None:
        """The step begins (CUDA: an event on the current stream)."""
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()

    def computed(self) -> None:
        """The step's forward and backward are enqueued (CUDA: the closing event)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending = (self._begin, end)

    def compute_s(self, host_compute_s: float) -> float:
        """The compute time to compare: the host's on CPU; on CUDA the GPU time of the latest
        step whose events are complete (the host's until the first one is)."""
        if not self.cuda:
            return host_compute_s
        if self._pending is not None and self._pending[1].query():
            begin, end = self._pending
            self.last_gpu_s, self._pending = begin.elapsed_time(end) / 1000.0, None
        return self.last_gpu_s if self.last_gpu_s is not None else host_compute_s


class StragglerDetector:
    """Compares the ranks' compute times each step and names a persistently slower one."""

    def __init__(self, factor: float, world, events, rank: int):
        self.factor, self.world, self.events, self.rank = factor, world, events, rank
        self.slowdowns: list[deque] = []
        self.named: set[int] = set()

    def after_step(self, step: int, compute_s: float, wait_s: float) -> dict:
        """Exchange this step's times (every rank calls it); metrics for the step record."""
        values = all_gather_values([int(compute_s * 1e6), int(wait_s * 1e6)], self.world, purpose="stragglers")
        return self.judge(step, [v[0] / 1e6 for v in values], [v[1] / 1e6 for v in values])

    def judge(self, step: int, compute: list[float], wait: list[float]) -> dict:
        """Every rank's times of step index `step`: name a new straggler; the step's metrics."""
        if not self.slowdowns:
            self.slowdowns = [deque(maxlen=WINDOW) for _ in compute]
        worst = 0.0
        for r, mine in enumerate(compute):
            peers = statistics.median(c for i, c in enumerate(compute) if i != r)
            self.slowdowns[r].append(mine / max(peers, 1e-9))
            if len(self.slowdowns[r]) < WINDOW:
                continue
            slowdown, persistent = statistics.median(self.slowdowns[r]), min(self.slowdowns[r]) > self.factor
            worst = max(worst, slowdown)
            if persistent and r not in self.named:
                self.named.add(r)
                self._record(step, r, slowdown, compute, wait)
            elif slowdown <= self.factor:  # recovered: a later slowdown is named again
                self.named.discard(r)
        return {"compute_s": compute[self.rank], "wait_s": wait[self.rank], "straggler_slowdown": worst,
                "compute_s_by_rank": compute, "wait_s_by_rank": wait}

    def _record(self, step: int, slow: int, slowdown: float, compute: list, wait: list) -> None:
        if self.rank != 0:
            return
        peers = statistics.median(c for i, c in enumerate(compute) if i != slow)
        print(f"apogee: straggler: rank {slow} computes {slowdown:.2f}x slower than its peers over the last "
              f"{WINDOW} steps (resilience.straggler_factor={self.factor:g}) at step {step + 1}", file=sys.stderr,
              flush=True)
        if self.events is not None:
            self.events.record("straggler", step=step + 1, slow_rank=slow, slowdown=round(slowdown, 3),
                               factor=self.factor, window=WINDOW, compute_s=compute[slow], peers_compute_s=peers,
                               wait_s=wait)

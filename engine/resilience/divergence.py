"""Where a replay first diverges from the original: each rank's step trace, and the verdict.

While a step runs, `StepTrace` is the comm ledger's observer (parallel/collectives.py): it keeps
the exact fingerprint (engine/resilience/sdc.py) of everything this rank hands to a collective
(its own, LOCAL result) and of everything a collective gives back (RECEIVED), in program order,
plus a few local results of its own (local gradient buckets where no reduction follows, the local
loss, the parameters at check steps). Replaying the step from the same state must reproduce the
trace bit for bit. Where it first differs says who computed differently:

    first difference is a LOCAL entry      this rank computed a different result from inputs that
                                           were the same as before: its own arithmetic changed
    first difference is a RECEIVED entry   another rank's change reached it through a collective

One faulty rank diverges in its own local result before any collective mixes it in; its tensor,
context, pipeline and data-parallel peers diverge only at what they receive after that. So an SDC
on one TP rank is named at tp2, where every rank's loss and gradients differ on replay. When
more than one rank changed its own result independently (the rehearsal `replay_noise` makes every
rank's very first local result differ), no single fault explains it: the kernels are not
deterministic, and nobody is accused (`judge`).

Entries are 0-dim int64 tensors on the device while the step runs. A step's trace stays on the
device after it (`stash`: one stack, no sync) and is read when it is needed: every pending step at
once at a replica-check step (or a save), a single one when a replay is diagnosed (`freeze`).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Optional

import torch

from engine.resilience.sdc import fingerprint_tensor

LOCAL, RECEIVED = 0, 1
SAME, DIVERGED_LOCAL, DIVERGED_RECEIVED = 0, 1, 2  # a rank's report: how its replay first differs


@dataclass(frozen=True)
class FrozenTrace:
    """One computation of a step, read to the host: fingerprints, entry kinds and labels, in order."""

    values: array
    kinds: bytes
    labels: tuple
    """A str, or (group name, op) of a collective (formatted by `label`, kept raw to stay small)."""

    def __len__(self) -> int:
        return len(self.values)

    def label(self, i: int) -> str:
        """What entry `i` is, in words."""
        label = self.labels[i]
        if isinstance(label, str):
            return label
        group, op = label
        return f"its input to {op} on {group}" if self.kinds[i] == LOCAL else f"the result of {op} on {group}"


@dataclass(frozen=True)
class Divergence:
    """Where a replay first differs from its original: entry `index`, its kind and what it was."""

    index: int
    kind: int
    label: str

    @property
    def code(self) -> int:
        """DIVERGED_LOCAL or DIVERGED_RECEIVED (what a rank reports to the others)."""
        return DIVERGED_LOCAL if self.kind == LOCAL else DIVERGED_RECEIVED


def first_divergence(replay: FrozenTrace, original: FrozenTrace) -> Optional[Divergence]:
    """The first entry of their common prefix at which `replay` differs from `original`; None if none.

    Only the common prefix counts: a replay may record more (parameters at steps it compares).
    """
    for i in range(min(len(replay), len(original))):
        if replay.values[i] != original.values[i] or replay.kinds[i] != original.kinds[i]:
            return Divergence(i, replay.kinds[i], replay.label(i))
    return None


@dataclass(frozen=True)
class Verdict:
    """What the ranks' reports say, identical on every rank (they all judge the same gathered list)."""

    diverged: list
    """Ranks whose replay differs at all."""
    origins: list
    """Ranks whose first difference is their own local result."""
    faulty: list
    """Ranks named (an SDC); empty when nothing diverged or when the kernels are nondeterministic."""
    nondeterministic: bool

    def __bool__(self) -> bool:
        return bool(self.diverged)


def judge(reports: list) -> Verdict:
    """Reports [(code, index), ...] by rank -> the verdict (see the module docstring).

    A single origin is the faulty rank. Several origins cannot come from one fault, whose change
    reaches the others only through collectives: the replay is not deterministic. No origin but a
    changed receipt means the value changed between two ranks (in transit, or outside the traced
    collectives): the receivers are named, over-inclusive rather than missing.
    """
    diverged = [rank for rank, (code, _) in enumerate(reports) if code != SAME]
    origins = [rank for rank, (code, _) in enumerate(reports) if code == DIVERGED_LOCAL]
    if len(origins) > 1:
        return Verdict(diverged, origins, [], True)
    return Verdict(diverged, origins, origins or diverged, False)


def perturb(tensor: torch.Tensor) -> None:
    """Flip the lowest bit of element 0 (one ulp of a float): what a nondeterministic kernel does.

    Through `.data`, so autograd's version counter does not see it: a kernel's own result is
    simply different, as after a reduction in another order.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return
    flat = tensor.data.view(-1)
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
    flat[:1].view(width).bitwise_xor_(1)


class StepTrace:
    """This rank's trace of one computation of a step; the comm ledger's observer while `active`.

    `noise` (the rehearsal `replay_noise`) perturbs the first local result before it is recorded.
    """

    def __init__(self, active: bool = False, noise: bool = False):
        self.active, self.noise = active, noise
        self._values: list = []  # 0-dim int64 tensors, or ints recorded as such
        self._kinds = bytearray()
        self._labels: list = []  # str, or (group name, op) formatted when read
        self._names: dict[int, str] = {}  # id(tensor) -> what it is, for the next collective that takes it

    def name(self, tensor: torch.Tensor, label: str) -> None:
        """Call the next collective's `tensor` by `label` (e.g. 'local gradient (bucket 3)')."""
        self._names[id(tensor)] = label

    def _add(self, kind: int, label, value) -> None:
        self._values.append(value)
        self._kinds.append(kind)
        self._labels.append(label)

    def local(self, group, op: str, tensor: torch.Tensor) -> None:
        """A collective is handed `tensor`, this rank's own result (observer hook)."""
        if self.active:
            self.add_local(self._names.pop(id(tensor), (group.name, op)), tensor)

    def received(self, group, op: str, tensor: torch.Tensor) -> None:
        """A collective gave back `tensor` (observer hook)."""
        if self.active:
            self._add(RECEIVED, (group.name, op), fingerprint_tensor(tensor))

    def add_local(self, label, tensor: torch.Tensor) -> None:
        """Record one of this rank's own results (perturbed first, if this is the noisy replay's first)."""
        if self.noise and LOCAL not in self._kinds:
            perturb(tensor)
        self._add(LOCAL, label, fingerprint_tensor(tensor))

    def add_local_value(self, label: str, value) -> None:
        """Record a local result that is already a fingerprint: an int, or a 0-dim int64 tensor
        still on the device (the parameter fingerprints of a check step)."""
        self._add(LOCAL, label, value if isinstance(value, torch.Tensor) else int(value))

    def stash(self) -> "PendingTrace":
        """The trace so far, left on the device (no host sync): `read_pending` reads it later."""
        tensors = [v for v in self._values if isinstance(v, torch.Tensor)]
        stacked = torch.stack(tensors) if tensors else None
        return PendingTrace(list(self._values), stacked, bytes(self._kinds), tuple(self._labels))

    def freeze(self) -> FrozenTrace:
        """The trace so far, read to the host at once (it keeps recording)."""
        tensors = [(i, v) for i, v in enumerate(self._values) if isinstance(v, torch.Tensor)]
        values = list(self._values)
        if tensors:
            read = torch.stack([v for _, v in tensors]).tolist()
            for (i, _), value in zip(tensors, read):
                values[i] = value
        return FrozenTrace(array("q", values), bytes(self._kinds), tuple(self._labels))


@dataclass(frozen=True)
class PendingTrace:
    """A step's trace whose fingerprints are still on the device (`StepTrace.stash`)."""

    values: list
    """Ints, and 0-dim tensors standing for the entries of `stacked` in order."""
    stacked: Optional[torch.Tensor]
    kinds: bytes
    labels: tuple


def read_pending(traces: list) -> list:
    """FrozenTraces of `traces` (PendingTrace or FrozenTrace), the pending ones read in one host sync."""
    pending = [t for t in traces if isinstance(t, PendingTrace) and t.stacked is not None]
    read = torch.cat([t.stacked for t in pending]).tolist() if pending else []
    out, at = [], 0
    for trace in traces:
        if not isinstance(trace, PendingTrace):
            out.append(trace)
            continue
        values = []
        for v in trace.values:
            if isinstance(v, torch.Tensor):
                v, at = read[at], at + 1
            values.append(v)
        out.append(FrozenTrace(array("q", values), trace.kinds, trace.labels))
    return out

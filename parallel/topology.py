"""This rank's place in the parallel layout: its coordinates, device and process groups.

The rank math (grids, groups, Megatron's 'tp-cp-ep-dp-pp' order) is pure Python in
parallel/layout.py; `ParallelContext` turns it into torch.distributed process groups for one
rank and is passed explicitly to everything that communicates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.collectives import CommLedger, Group
from parallel.layout import CONTEXT_KINDS, EMBEDDING_KIND, ParallelLayout, TopologyError


def _default_device() -> torch.device:
    # NCCL needs each rank on its own GPU; gloo (and a single process) computes on the CPU.
    if dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True, eq=False)
class ParallelContext:
    """This rank's place in the grid: dims, ranks, device and one process group per kind.

    Passed explicitly to everything that communicates; there is no global parallel state.
    Kinds: 'tp', 'cp', 'dp', 'pp', 'dp-cp', 'tp-pp' (dense grid), 'ep', 'expert-tp',
    'expert-dp', 'expert-tp-ep' (expert grid), 'embedding' (first and last stage) and 'world'.
    """

    dims: ParallelLayout
    rank: int
    world_size: int
    device: torch.device
    coords: dict[str, int]
    """Dense-grid tp, cp, dp, pp and the ep index, as in `ParallelLayout.coordinates`."""
    _members: dict[str, list[int]] = field(repr=False)
    _process_groups: dict[str, Any] = field(repr=False)

    @classmethod
    def create(cls, dims: ParallelLayout, device: torch.device | str | None = None) -> "ParallelContext":
        """Build every process group; call on all ranks after torch.distributed.init_process_group."""
        if not dist.is_initialized():
            raise TopologyError("ParallelContext.create needs torch.distributed.init_process_group first; "
                                "use ParallelContext.single() for a one-process run")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        dims.validate(world_size)
        members: dict[str, list[int]] = {"world": list(range(world_size))}
        process_groups: dict[str, Any] = {"world": dist.group.WORLD}
        by_members: dict[tuple[int, ...], Any] = {tuple(members["world"]): dist.group.WORLD}
        # dist.new_group is collective over the whole world: every rank must call it for every
        # group, members or not, in the same order, or ranks pair up the wrong groups (and hang).
        # So each rank walks all groups of every kind in one fixed order and keeps its own.
        # A layout where two kinds coincide (e.g. dp-cp == dp when cp=1) reuses one group;
        # every rank computes the same lists, so they all skip the same calls.
        for kind in CONTEXT_KINDS:
            for ranks in dims.groups(kind):
                key = tuple(ranks)
                if key not in by_members:
                    by_members[key] = dist.new_group(ranks)
                if rank in ranks:
                    members[kind] = ranks
                    process_groups[kind] = by_members[key]
        if EMBEDDING_KIND not in members:  # a middle pipeline stage holds no embedding copy
            members[EMBEDDING_KIND], process_groups[EMBEDDING_KIND] = [rank], None
        device = torch.device(device) if device is not None else _default_device()
        return cls(dims=dims, rank=rank, world_size=world_size, device=device,
                   coords=dims.coordinates(rank), _members=members, _process_groups=process_groups)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelContext":
        """A one-process context without torch.distributed: all sizes 1, every group None."""
        members = {kind: [0] for kind in (*CONTEXT_KINDS, "world")}
        return cls(dims=ParallelLayout(dp=1), rank=0, world_size=1, device=torch.device(device),
                   coords=ParallelLayout(dp=1).coordinates(0), _members=members,
                   _process_groups=dict.fromkeys(members))

    @classmethod
    def for_rank(cls, dims: ParallelLayout, rank: int, device: torch.device | str = "cpu") -> "ParallelContext":
        """Rank `rank`'s context without torch.distributed: real sizes and ranks, every group None.

        For rank math only (tests, planning, RNG keys); it cannot communicate.
        """
        dims.validate()
        members = {kind: dims.group_of(kind, rank) for kind in CONTEXT_KINDS}
        members["world"] = list(range(dims.world_size))
        return cls(dims=dims, rank=rank, world_size=dims.world_size, device=torch.device(device),
                   coords=dims.coordinates(rank), _members=members, _process_groups=dict.fromkeys(members))

    def _check_kind(self, kind: str) -> None:
        if kind not in self._members:
            raise KeyError(f"unknown group kind {kind!r}; known: {sorted(self._members)}")

    def group(self, kind: str):
        """The torch.distributed process group of `kind` holding this rank (None in `single`)."""
        self._check_kind(kind)
        return self._process_groups[kind]

    def ranks_in(self, kind: str) -> list[int]:
        """Global ranks of this rank's group of `kind`, ascending."""
        self._check_kind(kind)
        return list(self._members[kind])

    def comm_group(self, kind: str, ledger: CommLedger) -> Group:
        """This rank's group of `kind` as a collectives.Group that books its traffic in `ledger`."""
        return Group(kind, self.group(kind), self.size(kind), self.rank_in(kind), ledger, self.device)

    def size(self, kind: str) -> int:
        """Number of ranks in this rank's group of `kind`."""
        self._check_kind(kind)
        return len(self._members[kind])

    def rank_in(self, kind: str) -> int:
        """This rank's index inside its group of `kind`."""
        self._check_kind(kind)
        return self._members[kind].index(self.rank)

    tp_rank = property(lambda self: self.rank_in("tp"), doc="Index in the TP group.")
    tp_size = property(lambda self: self.size("tp"), doc="TP group size.")
    cp_rank = property(lambda self: self.rank_in("cp"), doc="Index in the CP group.")
    cp_size = property(lambda self: self.size("cp"), doc="CP group size.")
    dp_rank = property(lambda self: self.rank_in("dp"), doc="Index in the dense DP group.")
    dp_size = property(lambda self: self.size("dp"), doc="Dense DP group size.")
    pp_rank = property(lambda self: self.rank_in("pp"), doc="Pipeline stage index.")
    pp_size = property(lambda self: self.size("pp"), doc="Number of pipeline stages.")
    ep_rank = property(lambda self: self.rank_in("ep"), doc="Index in the EP group (which experts).")
    ep_size = property(lambda self: self.size("ep"), doc="EP group size.")
    expert_tp_rank = property(lambda self: self.rank_in("expert-tp"), doc="Index in the expert-TP group.")
    expert_tp_size = property(lambda self: self.size("expert-tp"), doc="Expert-TP group size.")
    expert_dp_rank = property(lambda self: self.rank_in("expert-dp"), doc="Index in the expert-DP group.")
    expert_dp_size = property(lambda self: self.size("expert-dp"), doc="Expert-DP group size.")

    @property
    def is_first_stage(self) -> bool:
        """True on pipeline stage 0 (it holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it holds the head and the loss)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def next_stage_rank(self) -> int:
        """Global rank of the next stage in my PP group; wraps from last to first, as in Megatron
        (interleaved schedules send from the last stage to the first for the next virtual chunk)."""
        pp = self._members["pp"]
        return pp[(self.pp_rank + 1) % len(pp)]

    @property
    def prev_stage_rank(self) -> int:
        """Global rank of the previous stage in my PP group; wraps from first to last."""
        pp = self._members["pp"]
        return pp[(self.pp_rank - 1) % len(pp)]

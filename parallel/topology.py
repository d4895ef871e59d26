"""The 4D grid: parallel sizes, rank coordinates and process groups, in Megatron's rank order.

Ranks are laid out on the axes 'tp-cp-ep-dp-pp' (Megatron-Core's default order): tp varies
fastest, pp slowest, so a TP group is a run of neighbouring ranks (one node, fast links) and a
PP group strides across the whole machine. Two grids share the same ranks:

- the dense grid  tp x cp x dp x pp            (attention, dense MLP, embeddings), ep = 1;
- the expert grid expert_tp x ep x expert_dp x pp (MoE layers), cp = 1, where
  expert_dp = world / (expert_tp * ep * pp). Expert parallelism is carved out of the dense
  tp*cp*dp ranks of one pipeline stage, so both grids have the same PP groups.

Groups are identical to megatron-core's `RankGenerator.get_ranks` (tests check every layout up
to 16 ranks). The rank math here is pure Python/numpy; `ParallelContext` turns it into
torch.distributed process groups for one rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

ORDER = "tp-cp-ep-dp-pp"
"""Megatron's rank order: the leftmost axis varies fastest."""

JSON_GROUP_KINDS = ("tp", "cp", "ep", "dp", "pp", "dp-cp", "tp-pp")
"""Group kinds in `topology_dict` / `apogee topology --json` (a stable interface for scripts)."""

EXPERT_KINDS = {"ep": "ep", "expert-tp": "tp", "expert-dp": "dp", "expert-tp-ep": "tp-ep"}
"""Group kinds that live on the expert grid, mapped to the axes they span there."""

CONTEXT_KINDS = ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "ep", "expert-tp", "expert-dp",
                 "expert-tp-ep", "embedding")
"""Kinds for which `ParallelContext` builds a process group (plus 'world')."""

EMBEDDING_KIND = "embedding"
"""Megatron's embedding group: the first and last stage of each PP group, which hold the two copies
of tied input/output embeddings. A middle stage is alone in its own (size-1) embedding group."""


class TopologyError(ValueError):
    """A parallel layout that cannot be built; the message names the field, value and what is valid."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Parallel sizes of one run: world = tp * cp * dp * pp; ep and expert_tp shape the MoE grid."""

    tp: int = 1
    """Tensor-parallel size (dense layers)."""
    cp: int = 1
    """Context-parallel size (sequence chunks, ring attention)."""
    dp: int = 1
    """Data-parallel size of the dense grid."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    ep: int = 1
    """Expert-parallel size, carved out of the dense tp*cp*dp ranks of a stage."""
    expert_tp: int | None = None
    """Tensor-parallel size inside an expert; None means the same as tp."""

    @property
    def world_size(self) -> int:
        """Number of ranks: tp * cp * dp * pp."""
        return self.tp * self.cp * self.dp * self.pp

    @property
    def etp(self) -> int:
        """Expert tensor-parallel size with the default applied."""
        return self.tp if self.expert_tp is None else self.expert_tp

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert grid: world / (expert_tp * ep * pp)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                        expert_tp: int | None = None) -> "ParallelDims":
        """Derive dp = world / (tp*cp*pp) and validate; raises TopologyError if it does not divide."""
        model_parallel = tp * cp * pp
        if model_parallel < 1 or world_size % model_parallel:
            raise TopologyError(
                f"tp*cp*pp = {tp}*{cp}*{pp} = {model_parallel} does not divide the world size "
                f"{world_size}, so dp cannot be derived; valid tp*cp*pp: {_divisors(world_size)}")
        dims = cls(tp=tp, cp=cp, dp=world_size // model_parallel, pp=pp, ep=ep, expert_tp=expert_tp)
        return dims.validate(world_size)

    def validate(self, world_size: int | None = None) -> "ParallelDims":
        """Raise TopologyError unless the layout is buildable (on `world_size` ranks if given)."""
        for name in ("tp", "cp", "dp", "pp", "ep", "expert_tp"):
            value = getattr(self, name)
            if name == "expert_tp" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TopologyError(f"{name}={value!r} must be a positive integer (>= 1)")
        if world_size is not None and self.world_size != world_size:
            hint = ""
            model_parallel = self.tp * self.cp * self.pp
            if world_size % model_parallel == 0:
                hint = f"; with tp={self.tp}, cp={self.cp}, pp={self.pp} use dp={world_size // model_parallel}"
            raise TopologyError(
                f"tp*cp*dp*pp = {self.tp}*{self.cp}*{self.dp}*{self.pp} = {self.world_size} "
                f"does not equal the world size {world_size}{hint}")
        # The expert grid must tile the ranks of one pipeline stage (tp*cp*dp of them) so that
        # both grids share their PP groups; Megatron asserts the same.
        stage_ranks = self.tp * self.cp * self.dp
        if stage_ranks % (self.etp * self.ep):
            if self.expert_tp is None or self.expert_tp == self.tp:
                valid = _divisors(self.cp * self.dp)
                raise TopologyError(
                    f"ep={self.ep} must divide dp*cp={self.dp * self.cp} (experts are spread over "
                    f"the data- and context-parallel ranks of a stage); valid ep: {valid}")
            valid = [d for d in _divisors(stage_ranks) if d % self.etp == 0]
            valid_ep = [d // self.etp for d in valid]
            raise TopologyError(
                f"expert_tp*ep = {self.etp}*{self.ep} = {self.etp * self.ep} must divide "
                f"tp*cp*dp = {stage_ranks} (so that expert_tp*ep*pp divides the world size "
                f"{self.world_size}); valid ep for expert_tp={self.etp}: {valid_ep}")
        return self

    def dense_grid(self) -> "RankGrid":
        """The grid of attention/dense layers: tp x cp x dp x pp (ep = 1)."""
        self.validate()
        return RankGrid(dict(tp=self.tp, cp=self.cp, ep=1, dp=self.dp, pp=self.pp))

    def expert_grid(self) -> "RankGrid":
        """The grid of MoE layers: expert_tp x ep x expert_dp x pp (cp = 1)."""
        self.validate()
        return RankGrid(dict(tp=self.etp, cp=1, ep=self.ep, dp=self.expert_dp, pp=self.pp))

    def _grid_and_axes(self, kind: str) -> tuple["RankGrid", str]:
        if kind in EXPERT_KINDS:
            return self.expert_grid(), EXPERT_KINDS[kind]
        return self.dense_grid(), kind

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of `kind` ('tp', 'dp-cp', 'ep', 'expert-dp', 'embedding', ...), members ascending."""
        if kind == EMBEDDING_KIND:
            return [sorted({pp[0], pp[-1]}) for pp in self.groups("pp")]
        grid, axes = self._grid_and_axes(kind)
        return grid.groups(axes)

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The global ranks of `rank`'s group of `kind`, ascending."""
        if kind == EMBEDDING_KIND:
            return next((g for g in self.groups(kind) if rank in g), [rank])
        grid, axes = self._grid_and_axes(kind)
        return grid.group_of(axes, rank)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Rank's position: tp, cp, dp, pp on the dense grid; ep = its index in its EP group.

        ep is read from the expert grid (where EP lives), i.e. the position of the rank inside
        its expert-parallel group = which slice of the experts it holds.
        """
        dense = self.dense_grid().coordinates(rank)
        expert = self.expert_grid().coordinates(rank)
        return {"tp": dense["tp"], "cp": dense["cp"], "ep": expert["ep"], "dp": dense["dp"],
                "pp": dense["pp"]}


class RankGrid:
    """Ranks 0..N-1 laid out on named axes in a given order, the leftmost varying fastest.

    Picotron-style: the grid is `arange(N).reshape(sizes in reversed order)`, so a rank's
    coordinates are its multi-index and a group of kind 'dp-cp' is a slice that varies dp and cp
    while every other axis is fixed. Same result as Megatron's
    generate_masked_orthogonal_rank_groups, written as array indexing.
    """

    def __init__(self, sizes: Mapping[str, int], order: str = ORDER):
        self.axes = order.split("-")
        missing = set(sizes) - set(self.axes)
        if missing:
            raise TopologyError(f"axes {sorted(missing)} are not in the order {order!r}")
        self.sizes = {axis: int(sizes.get(axis, 1)) for axis in self.axes}
        self.world_size = int(np.prod(list(self.sizes.values())))
        # C order makes the last array axis fastest, so reverse: pp is axis 0, tp the last axis.
        self._reversed_axes = self.axes[::-1]
        self._grid = np.arange(self.world_size).reshape([self.sizes[a] for a in self._reversed_axes])

    def _parse(self, kind: str) -> list[str]:
        wanted = kind.split("-")
        unknown = [a for a in wanted if a not in self.axes]
        if unknown or len(set(wanted)) != len(wanted):
            raise TopologyError(f"group kind {kind!r} must name distinct axes from {self.axes}")
        return wanted

    def groups(self, kind: str) -> list[list[int]]:
        """All groups spanning the axes in `kind` (e.g. 'tp' or 'dp-cp'), members ascending.

        Groups are ordered by the remaining axes with the leftmost (in `order`) varying fastest,
        and members likewise, which is Megatron's enumeration.
        """
        wanted = set(self._parse(kind))
        # Array positions keep the reversed order, so within each part the fastest axis is last:
        # fixed axes index the group, varying axes index the member.
        fixed = [i for i, a in enumerate(self._reversed_axes) if a not in wanted]
        varying = [i for i, a in enumerate(self._reversed_axes) if a in wanted]
        group_size = int(np.prod([self._grid.shape[i] for i in varying]))
        return self._grid.transpose(fixed + varying).reshape(-1, group_size).tolist()

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The group of `kind` that contains `rank`."""
        self._check_rank(rank)
        wanted = set(self._parse(kind))
        index = tuple(slice(None) if a in wanted else c
                      for a, c in zip(self._reversed_axes, np.unravel_index(rank, self._grid.shape)))
        return sorted(np.asarray(self._grid[index]).reshape(-1).tolist())

    def coordinates(self, rank: int) -> dict[str, int]:
        """{axis: index} of `rank` on this grid, in `order`."""
        self._check_rank(rank)
        multi_index = np.unravel_index(rank, self._grid.shape)
        by_axis = {a: int(i) for a, i in zip(self._reversed_axes, multi_index)}
        return {a: by_axis[a] for a in self.axes}

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank={rank} is outside the grid of {self.world_size} ranks (0..{self.world_size - 1})")


def topology_dict(dims: ParallelDims) -> dict[str, Any]:
    """The `apogee topology --json` document: world size, every group of each kind, each rank's coordinates."""
    dims.validate()
    return {
        "world_size": dims.world_size,
        "groups": {kind: dims.groups(kind) for kind in JSON_GROUP_KINDS},
        "ranks": [{"rank": r, **dims.coordinates(r)} for r in range(dims.world_size)],
    }


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

    dims: ParallelDims
    rank: int
    world_size: int
    device: torch.device
    coords: dict[str, int]
    """Dense-grid tp, cp, dp, pp and the ep index, as in `ParallelDims.coordinates`."""
    _members: dict[str, list[int]] = field(repr=False)
    _process_groups: dict[str, Any] = field(repr=False)

    @classmethod
    def create(cls, dims: ParallelDims, device: torch.device | str | None = None) -> "ParallelContext":
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
        return cls(dims=ParallelDims(), rank=0, world_size=1, device=torch.device(device),
                   coords=ParallelDims().coordinates(0), _members=members,
                   _process_groups=dict.fromkeys(members))

    @classmethod
    def for_rank(cls, dims: ParallelDims, rank: int, device: torch.device | str = "cpu") -> "ParallelContext":
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


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `apogee topology`: --tp --pp --cp --dp --ep [--expert-tp] [--world-size] [--json]."""
    for name, help_text in (("tp", "tensor-parallel size"), ("pp", "pipeline-parallel size"),
                            ("cp", "context-parallel size"), ("dp", "data-parallel size"),
                            ("ep", "expert-parallel size (must divide dp*cp when expert-tp = tp)")):
        parser.add_argument(f"--{name}", type=int, default=1, metavar=name.upper(), help=f"{help_text} (default 1)")
    parser.add_argument("--expert-tp", type=int, default=None, metavar="N",
                        help="tensor-parallel size inside an expert (default: same as --tp)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="check the layout against this many ranks")
    parser.add_argument("--json", action="store_true",
                        help='print {"world_size", "groups": {kind: [[ranks]]}, "ranks": [coordinates]}')
    return parser


def _describe(dims: ParallelDims) -> str:
    expert = f" ep={dims.ep} expert_tp={dims.etp} expert_dp={dims.expert_dp}" if dims.ep > 1 or dims.etp != dims.tp else ""
    lines = [f"world_size={dims.world_size}: tp={dims.tp} cp={dims.cp} dp={dims.dp} pp={dims.pp}{expert} (order {ORDER})"]
    kinds = (*JSON_GROUP_KINDS, "expert-tp", "expert-dp")
    for rank in range(dims.world_size):
        coords = " ".join(f"{k}={v}" for k, v in dims.coordinates(rank).items())
        groups = " ".join(f"{kind}={dims.group_of(kind, rank)}".replace(" ", "") for kind in kinds)
        lines.append(f"rank {rank:>3}: {coords}  {groups}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Print each rank's coordinates and groups (or the JSON document); 2 on an invalid layout."""
    dims = ParallelDims(tp=args.tp, cp=args.cp, dp=args.dp, pp=args.pp, ep=args.ep, expert_tp=args.expert_tp)
    try:
        dims.validate(getattr(args, "world_size", None))
    except TopologyError as error:
        print(f"apogee topology: {error}", file=sys.stderr)
        return 2
    print(json.dumps(topology_dict(dims)) if args.json else _describe(dims))
    return 0

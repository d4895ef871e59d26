"""The parallel layout and its rank grid: sizes, coordinates and groups in Megatron's rank order.

Ranks are laid out on the axes 'tp-cp-ep-dp-pp' (Megatron-Core's default order): tp varies
fastest, pp slowest, so a TP group is a run of neighbouring ranks (one node, fast links) and a
PP group strides across the whole machine. Two grids share the same ranks:

- the dense grid  tp x cp x dp x pp            (attention, dense MLP, embeddings), ep = 1;
- the expert grid expert_tp x ep x expert_dp x pp (MoE layers), cp = 1, where
  expert_dp = world / (expert_tp * ep * pp). Expert parallelism is carved out of the dense
  tp*cp*dp ranks of one pipeline stage, so both grids have the same PP groups.

Groups are identical to megatron-core's `RankGenerator.get_ranks` (tests check every layout up
to 16 ranks). Everything here is pure Python/numpy; parallel/topology.py turns it into
torch.distributed process groups for one rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

ORDER = "tp-cp-ep-dp-pp"
"""Megatron's rank order: the leftmost axis varies fastest."""

JSON_GROUP_KINDS = ("tp", "cp", "ep", "dp", "pp", "dp-cp", "tp-pp")
"""Group kinds in `topology_dict` / `apogee topology --json` (a stable interface for scripts)."""

EXPERT_KINDS = {"ep": "ep", "expert-tp": "tp", "expert-dp": "dp", "expert-tp-ep": "tp-ep"}
"""Group kinds that live on the expert grid, mapped to the axes they span there."""

CONTEXT_KINDS = ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp-dp", "ep", "expert-tp", "expert-dp",
                 "expert-tp-ep", "embedding")
"""Kinds for which `ParallelContext` builds a process group (plus 'world'). 'tp-cp-dp' holds the ranks
of one pipeline stage: the amax reduction group of fp8 delayed scaling (Megatron's amax group)."""

EMBEDDING_KIND = "embedding"
"""Megatron's embedding group: the first and last stage of each PP group, which hold the two copies
of tied input/output embeddings. A middle stage is alone in its own (size-1) embedding group."""


class TopologyError(ValueError):
    """A parallel layout that cannot be built; the message names the field, value and what is valid."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelLayout:
    """How the world is split, the one layout type of config, topology and performance model.

    world = tp * cp * dp * pp in Megatron's rank order 'tp-cp-ep-dp-pp'; ep and expert_tp shape
    the MoE grid; virtual_stages, sequence_parallel, zero and grad_bucket_mb say how the engine
    runs on that grid. As the `parallel` section of a run's config, dp may be left out (None)
    and is derived from the world size when the config is validated.
    """

    tp: int = 1
    """Tensor-parallel size (dense layers)."""
    pp: int = 1
    """Pipeline-parallel size (stages)."""
    cp: int = 1
    """Context-parallel size (ring attention over sequence chunks)."""
    dp: Optional[int] = None
    """Data-parallel size of the dense grid; derived from the world size when left out."""
    ep: int = 1
    """Expert-parallel size, carved out of the dense tp*cp*dp ranks of a stage (MoE layers)."""
    expert_tp: Optional[int] = None
    """Tensor-parallel size inside an expert; None means the same as tp."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Shard norm/dropout regions along the sequence across TP ranks."""
    zero: int = 0
    """ZeRO stage over the data-parallel group: 0 (plain DP), 1, 2 or 3."""
    grad_bucket_mb: float = 25.0
    """Size of one gradient reduction bucket in MiB."""
    overlap_param_gather: bool = False
    """ZeRO-1/2: the updated parameters' all-gather runs behind the next forward, each module waiting
    for its own buckets (Megatron's --overlap-param-gather); False: gathered and waited for after the
    optimizer step. Same values either way."""

    @property
    def data_parallel(self) -> int:
        """dp for the grid math: 1 when left out (a run's config validation derives it from the world
        size before any grid is built)."""
        return 1 if self.dp is None else self.dp

    @property
    def world_size(self) -> int:
        """Number of ranks: tp * cp * dp * pp."""
        return self.tp * self.cp * self.data_parallel * self.pp

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
                        expert_tp: int | None = None) -> "ParallelLayout":
        """Derive dp = world / (tp*cp*pp) and validate; raises TopologyError if it does not divide."""
        model_parallel = tp * cp * pp
        if model_parallel < 1 or world_size % model_parallel:
            raise TopologyError(
                f"tp*cp*pp = {tp}*{cp}*{pp} = {model_parallel} does not divide the world size "
                f"{world_size}, so dp cannot be derived; valid tp*cp*pp: {_divisors(world_size)}")
        dims = cls(tp=tp, cp=cp, dp=world_size // model_parallel, pp=pp, ep=ep, expert_tp=expert_tp)
        return dims.validate(world_size)

    def validate(self, world_size: int | None = None) -> "ParallelLayout":
        """Raise TopologyError unless the layout is buildable (on `world_size` ranks if given)."""
        for name in ("tp", "cp", "dp", "pp", "ep", "expert_tp", "virtual_stages"):
            value = getattr(self, name)
            if name in ("expert_tp", "dp") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TopologyError(f"{name}={value!r} must be a positive integer (>= 1)")
        if world_size is not None and self.world_size != world_size:
            hint = ""
            model_parallel = self.tp * self.cp * self.pp
            if world_size % model_parallel == 0:
                hint = f"; with tp={self.tp}, cp={self.cp}, pp={self.pp} use dp={world_size // model_parallel}"
            raise TopologyError(
                f"tp*cp*dp*pp = {self.tp}*{self.cp}*{self.data_parallel}*{self.pp} = {self.world_size} "
                f"does not equal the world size {world_size}{hint}")
        # The expert grid must tile the ranks of one pipeline stage (tp*cp*dp of them) so that
        # both grids share their PP groups; Megatron asserts the same.
        stage_ranks = self.tp * self.cp * self.data_parallel
        if stage_ranks % (self.etp * self.ep):
            if self.expert_tp is None or self.expert_tp == self.tp:
                valid = _divisors(self.cp * self.data_parallel)
                raise TopologyError(
                    f"ep={self.ep} must divide dp*cp={self.data_parallel * self.cp} (experts are spread over "
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
        return RankGrid(dict(tp=self.tp, cp=self.cp, ep=1, dp=self.data_parallel, pp=self.pp))

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


def topology_dict(dims: ParallelLayout) -> dict[str, Any]:
    """The `apogee topology --json` document: world size, every group of each kind, each rank's coordinates."""
    dims.validate()
    return {
        "world_size": dims.world_size,
        "groups": {kind: dims.groups(kind) for kind in JSON_GROUP_KINDS},
        "ranks": [{"rank": r, **dims.coordinates(r)} for r in range(dims.world_size)],
    }

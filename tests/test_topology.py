"""parallel/layout.py and parallel/topology.py: rank groups match megatron-core, the JSON contract, clear errors, real groups."""
import argparse
import json
import warnings

import pytest

from cli.topology import add_cli_arguments, run_cli
from parallel.layout import ParallelLayout, RankGrid, TopologyError, topology_dict
from parallel.topology import ParallelContext
from tests.distributed import run_distributed

ORDER = "tp-cp-ep-dp-pp"
DENSE_KINDS = ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp", "tp-dp-cp", "tp-dp")
EXPERT_KINDS = {"ep": "ep", "expert-tp": "tp", "expert-dp": "dp", "expert-tp-ep": "tp-ep"}


@pytest.fixture(scope="module")
def RankGenerator():
    with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine/apex
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    return RankGenerator


def valid_layouts(world_size):
    """Every ParallelLayout on `world_size` ranks that validates, expert_tp over None and all sizes."""
    for tp in range(1, world_size + 1):
        for cp in range(1, world_size // tp + 1):
            for pp in range(1, world_size // (tp * cp) + 1):
                if world_size % (tp * cp * pp):
                    continue
                dp = world_size // (tp * cp * pp)
                for ep in range(1, world_size + 1):
                    for expert_tp in (None, *range(1, world_size + 1)):
                        dims = ParallelLayout(tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, expert_tp=expert_tp)
                        try:
                            yield dims.validate(world_size)
                        except TopologyError:
                            pass


def cli(capsys, *argv):
    args = add_cli_arguments(argparse.ArgumentParser()).parse_args(list(argv))
    code = run_cli(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("world_size", range(1, 17))
def test_every_layout_matches_megatron_rank_generator(world_size, RankGenerator):
    layouts = list(valid_layouts(world_size))
    assert layouts
    for dims in layouts:
        dense = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=dims.cp, order=ORDER)
        expert_tp = dims.tp if dims.expert_tp is None else dims.expert_tp
        expert = RankGenerator(tp=expert_tp, ep=dims.ep, dp=world_size // (expert_tp * dims.ep * dims.pp),
                               pp=dims.pp, cp=1, order=ORDER)
        for kind in DENSE_KINDS:
            assert dims.groups(kind) == dense.get_ranks(kind), (dims, kind)
        for kind, axes in EXPERT_KINDS.items():
            assert dims.groups(kind) == expert.get_ranks(axes), (dims, kind)
        assert dims.expert_grid().groups("pp") == dims.groups("pp"), dims
        for rank in range(world_size):
            coords = dims.coordinates(rank)
            for kind in ("tp", "cp", "dp", "pp", "ep"):
                group = dims.group_of(kind, rank)
                assert group in dims.groups(kind)
                assert group.index(rank) == coords[kind], (dims, rank, kind)


def test_sixteen_ranks_example_from_interop_notes(RankGenerator):
    dims = ParallelLayout(tp=2, cp=2, dp=2, pp=2)
    assert dims.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert dims.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert dims.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert dims.groups("pp") == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert dims.groups("dp-cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    dense = RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=2, order=ORDER)
    assert all(dims.groups(k) == dense.get_ranks(k) for k in ("tp", "cp", "dp", "pp", "dp-cp"))


def test_rank_grid_coordinates_put_tp_fastest_and_pp_slowest():
    grid = RankGrid(dict(tp=2, cp=1, ep=1, dp=3, pp=2))
    assert grid.world_size == 12
    assert grid.coordinates(0) == dict(tp=0, cp=0, ep=0, dp=0, pp=0)
    assert grid.coordinates(1) == dict(tp=1, cp=0, ep=0, dp=0, pp=0)
    assert grid.coordinates(11) == dict(tp=1, cp=0, ep=0, dp=2, pp=1)
    assert grid.group_of("dp", 7) == [7, 9, 11]


def test_ep_coordinate_is_position_in_expert_parallel_group():
    # tp=2, dp=4, ep=2: the expert grid is expert_tp=2 x ep=2 x expert_dp=2; EP groups pair
    # ranks two apart, so ranks 0,1 hold expert slice 0 and ranks 2,3 slice 1.
    dims = ParallelLayout(tp=2, dp=4, ep=2)
    assert dims.groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [dims.coordinates(r)["ep"] for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert dims.expert_dp == 2 and dims.groups("expert-dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_json_has_exactly_the_documented_shape(capsys):
    code, out, err = cli(capsys, "--tp", "2", "--pp", "2", "--cp", "1", "--dp", "2", "--ep", "2", "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert list(doc) == ["world_size", "groups", "ranks"]
    assert doc["world_size"] == 8
    assert list(doc["groups"]) == ["tp", "cp", "ep", "dp", "pp", "dp-cp", "tp-pp"]
    assert doc["groups"]["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert doc["groups"]["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert doc["groups"]["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert doc["groups"]["tp-pp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    for kind, groups in doc["groups"].items():
        assert sorted(r for g in groups for r in g) == list(range(8)), kind
        assert all(g == sorted(g) and all(isinstance(r, int) for r in g) for g in groups), kind
    assert len(doc["ranks"]) == 8
    for rank, entry in enumerate(doc["ranks"]):
        assert list(entry) == ["rank", "tp", "cp", "ep", "dp", "pp"]
        assert all(type(v) is int for v in entry.values())
        assert entry["rank"] == rank
    assert doc["ranks"][5] == {"rank": 5, "tp": 1, "cp": 0, "ep": 0, "dp": 0, "pp": 1}
    assert doc == topology_dict(ParallelLayout(tp=2, cp=1, dp=2, pp=2, ep=2))


def test_human_format_prints_one_line_per_rank(capsys):
    code, out, _ = cli(capsys, "--tp", "2", "--dp", "2")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 1 + 4
    assert lines[2].startswith("rank   1: tp=1 cp=0 ep=0 dp=0 pp=0") and "tp=[0,1]" in lines[2]


@pytest.mark.parametrize("argv, expected", [
    (["--tp", "2", "--pp", "2", "--dp", "3", "--world-size", "8"],
     ["tp*cp*dp*pp = 2*1*3*2 = 12 does not equal the world size 8", "dp=2"]),
    (["--tp", "2", "--dp", "4", "--ep", "3"], ["ep=3 must divide dp*cp=4", "valid ep: [1, 2, 4]"]),
    (["--tp", "2", "--dp", "2", "--cp", "2", "--ep", "8"], ["ep=8 must divide dp*cp=4"]),
    (["--tp", "2", "--dp", "2", "--ep", "4", "--expert-tp", "2"], ["ep=4 must divide dp*cp=2"]),
    (["--tp", "1", "--dp", "4", "--ep", "2", "--expert-tp", "4"],
     ["expert_tp*ep = 4*2 = 8 must divide tp*cp*dp = 4"]),
    (["--tp", "0"], ["tp=0 must be a positive integer"]),
    (["--pp", "-2"], ["pp=-2 must be a positive integer"]),
    (["--ep", "0"], ["ep=0 must be a positive integer"]),
])
def test_bad_layout_is_refused_naming_field_and_value(capsys, argv, expected):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    for text in expected:
        assert text in err


def test_validate_raises_topology_error_which_is_a_value_error():
    with pytest.raises(ValueError, match=r"tp\*cp\*dp\*pp = 2\*1\*3\*2 = 12 does not equal the world size 8"):
        ParallelLayout(tp=2, dp=3, pp=2).validate(8)
    with pytest.raises(TopologyError, match="expert_tp=0"):
        ParallelLayout(expert_tp=0).validate()
    with pytest.raises(TopologyError, match="does not divide the world size 12"):
        ParallelLayout.from_world_size(12, tp=8)
    assert ParallelLayout.from_world_size(12, tp=2, pp=3) == ParallelLayout(tp=2, dp=2, pp=3)


def test_single_context_has_size_one_everywhere():
    ctx = ParallelContext.single()
    for kind in ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "ep", "expert-tp", "expert-dp", "world"):
        assert ctx.group(kind) is None and ctx.size(kind) == 1 and ctx.rank_in(kind) == 0
        assert ctx.ranks_in(kind) == [0]
    assert ctx.is_first_stage and ctx.is_last_stage and ctx.next_stage_rank == ctx.prev_stage_rank == 0
    assert str(ctx.device) == "cpu" and ctx.tp_size == ctx.ep_size == 1
    with pytest.raises(KeyError, match="unknown group kind 'tensor'"):
        ctx.group("tensor")


def _context_body(rank, world_size, dims):
    import torch
    import torch.distributed as dist

    ctx = ParallelContext.create(dims)
    report = {"rank": ctx.rank, "coords": ctx.coords, "device": str(ctx.device),
              "first": ctx.is_first_stage, "last": ctx.is_last_stage,
              "next": ctx.next_stage_rank, "prev": ctx.prev_stage_rank, "sums": {}, "ranks": {}}
    for kind in ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "ep", "expert-tp", "expert-dp", "world"):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=ctx.group(kind))
        report["sums"][kind] = value.item()
        report["ranks"][kind] = ctx.ranks_in(kind)
        assert ctx.size(kind) == len(ctx.ranks_in(kind))
        assert ctx.ranks_in(kind)[ctx.rank_in(kind)] == rank
    assert (ctx.tp_rank, ctx.cp_rank, ctx.dp_rank, ctx.pp_rank, ctx.ep_rank) == tuple(
        ctx.coords[k] for k in ("tp", "cp", "dp", "pp", "ep"))
    return report


@pytest.mark.distributed
def test_context_groups_on_eight_gloo_ranks():
    dims = ParallelLayout(tp=2, cp=1, dp=2, pp=2, ep=2)
    reports = run_distributed(_context_body, 8, dims, timeout=120)
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["device"] == "cpu"
        assert report["coords"] == dims.coordinates(rank)
        for kind, total in report["sums"].items():
            assert total == sum(report["ranks"][kind]), (rank, kind)
        assert report["ranks"]["tp"] == dims.group_of("tp", rank)
        assert report["ranks"]["ep"] == dims.group_of("ep", rank)
        assert report["ranks"]["world"] == list(range(8))
        offline = ParallelContext.for_rank(dims, rank)  # same rank math, no process groups
        assert all(report["ranks"][kind] == offline.ranks_in(kind) for kind in report["ranks"])
        assert offline.coords == report["coords"] and offline.group("tp") is None
        stage = rank // 4  # pp groups are [r, r + 4]
        assert report["first"] == (stage == 0) and report["last"] == (stage == 1)
        assert report["next"] == report["prev"] == (rank + 4) % 8

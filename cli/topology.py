"""`apogee topology`: each rank's coordinates and process groups for a layout (parallel/layout.py)."""
from __future__ import annotations

import argparse
import json
import sys

from parallel.layout import JSON_GROUP_KINDS, ORDER, ParallelLayout, TopologyError, topology_dict


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


def _describe(dims: ParallelLayout) -> str:
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
    dims = ParallelLayout(tp=args.tp, cp=args.cp, dp=args.dp, pp=args.pp, ep=args.ep, expert_tp=args.expert_tp)
    try:
        dims.validate(getattr(args, "world_size", None))
    except TopologyError as error:
        print(f"apogee topology: {error}", file=sys.stderr)
        return 2
    print(json.dumps(topology_dict(dims)) if args.json else _describe(dims))
    return 0

"""`apogee plan`: rank parallel layouts for a GPU cluster by the performance model (engine/perf/plan.py)."""
from __future__ import annotations

import argparse
import json
import sys

from cli.run import flatten
from engine.config import ConfigError, load_config
from engine.perf.hardware import known_gpus, make_cluster
from engine.perf.inputs import PerfModelError, assumption_keys, parse_assumptions
from engine.perf.plan import LAYOUT_KEYS, PlanError, estimate_dict, format_table, parse_layout, plan, world_of


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `apogee plan`: --config FILE [--set ...] [--gpus N] [--layout K=V,...] [--assume K=V ...]
    [--gpu H100] [--gpus-per-node 8] [--top 5] [--json]."""
    parser.add_argument("--config", required=True, help="YAML config file (model shape, global batch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys, e.g. --set model.hidden_size=12288 train.global_batch_size=1536")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size to plan for (may be left out with --layout: tp*cp*pp*dp, missing ones 1)")
    parser.add_argument("--layout", default="", metavar="K=V,...",
                        help=f"fix layout fields and search the others; keys: {', '.join(LAYOUT_KEYS)} "
                             "(e.g. tp=8,pp=16,dp=64); layouts that do not fit are listed too, after those that do")
    parser.add_argument("--assume", dest="assumptions", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help=f"the model's software assumptions (defaults: this engine as built), e.g. "
                             f"flash_attention=false; keys: {', '.join(assumption_keys())}")
    parser.add_argument("--gpu", default="H100", help=f"GPU type: {', '.join(known_gpus())} (default H100)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink domain, default 8)")
    parser.add_argument("--top", type=int, default=5, help="layouts to print (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of the table")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Print the best layouts; 2 with a message naming the bad option or key on bad input."""
    try:
        if args.top < 1:
            raise PlanError(f"--top={args.top}: must be >= 1")
        if args.gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node={args.gpus_per_node}: must be >= 1")
        try:
            cluster = make_cluster(args.gpu, args.gpus_per_node)
        except PerfModelError:
            raise PlanError(f"--gpu={args.gpu}: unknown GPU type; valid: {', '.join(known_gpus())}") from None
        fixed = parse_layout(args.layout)
        assume = parse_assumptions(flatten(args.assumptions))
        world = world_of(fixed, args.gpus)
        cfg = load_config(args.config, flatten(args.overrides))
        best, counts = plan(cfg, world, cluster, args.top, assume, fixed)
    except (PlanError, PerfModelError, ConfigError) as error:
        print(f"apogee plan: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": cfg.name, "gpus": world, "gpu": cluster.gpu.name,
                          "gpus_per_node": cluster.gpus_per_node, **counts, "fixed": fixed,
                          "layouts": [estimate_dict(e) for e in best]}, indent=2))
        return 0
    fixed_text = f"; fixed {args.layout}" if fixed else ""
    print(f"apogee plan: {cfg.name} on {world} x {cluster.gpu.name} ({cluster.gpus_per_node} per node), "
          f"global batch {cfg.train.global_batch_size} x {cfg.model.seq_length} tokens{fixed_text}; "
          f"{counts['valid']} valid layouts, {counts['fit']} fit in {cluster.gpu.hbm_bytes / 1e9:.0f} GB; "
          f"predicted by engine/perf/perf_model.py (not measured)")
    print(format_table(best, cluster.gpu.hbm_bytes))
    return 0

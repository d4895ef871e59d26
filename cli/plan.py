"""`apogee plan`: rank parallel layouts for a GPU cluster by the performance model (engine/perf/plan.py)."""
from __future__ import annotations

import argparse
import json
import sys

from cli.run import flatten
from engine.config import ConfigError, load_config
from engine.perf.perf_model import PerfModelError, known_gpus, make_cluster
from engine.perf.plan import PlanError, estimate_dict, format_table, plan


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `apogee plan`: --config FILE [--set ...] --gpus N [--gpu H100] [--gpus-per-node 8] [--top 5] [--json]."""
    parser.add_argument("--config", required=True, help="YAML config file (model shape, global batch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                        help="override config keys, e.g. --set model.seq_length=4096 train.global_batch_size=1024")
    parser.add_argument("--gpus", type=int, required=True, help="world size to plan for")
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
        cfg = load_config(args.config, flatten(args.overrides))
        best, counts = plan(cfg, args.gpus, cluster, args.top)
    except (PlanError, ConfigError) as error:
        print(f"apogee plan: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": cfg.name, "gpus": args.gpus, "gpu": cluster.gpu.name,
                          "gpus_per_node": cluster.gpus_per_node, **counts,
                          "layouts": [estimate_dict(e) for e in best]}, indent=2))
        return 0
    print(f"apogee plan: {cfg.name} on {args.gpus} x {cluster.gpu.name} ({cluster.gpus_per_node} per node), "
          f"global batch {cfg.train.global_batch_size} x {cfg.model.seq_length} tokens; "
          f"{counts['valid']} valid layouts, {counts['fit']} fit in {cluster.gpu.hbm_bytes / 1e9:.0f} GB; "
          f"predicted by engine/perf/perf_model.py (not measured)")
    print(format_table(best))
    return 0

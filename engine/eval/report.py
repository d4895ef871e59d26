"""`apogee eval`'s output: the side-by-side table of checkpoints, and their runs' validation-loss
curves drawn from each run directory's metrics.jsonl (matplotlib, an optional dependency)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

COLUMNS = ("loss", "ppl", "bits_per_byte", "accuracy", "reward_mean")
"""Metric columns in table order (pass@k columns follow; a column shows when any row has it)."""


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(rows: list[dict], names: Optional[list[str]] = None) -> str:
    """A plain-text table: one line per checkpoint (named as given on the command line), one column per metric."""
    passes = sorted({key for row in rows for key in row if key.startswith("pass@")}, key=lambda k: int(k[5:]))
    columns = [c for c in (*COLUMNS, *passes) if any(c in row for row in rows)]
    names = names or [row["checkpoint"] for row in rows]
    header = ["checkpoint", "step", *columns]
    body = [[name, _cell(row.get("step")), *(_cell(row.get(c)) for c in columns)] for name, row in zip(names, rows)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def validation_curve(run_dir: Path) -> tuple[list, list, str]:
    """(steps, values, what) from a run's metrics.jsonl: val_loss, else the training loss. A step
    logged twice (a rewind or a restart replays steps) counts once, with its last value, the one
    the run went on from."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key, what in (("val_loss", "validation loss"), ("loss", "training loss")):
        last = {r["step"]: r[key] for r in records if r.get(key) is not None}
        if last or key == "loss":
            steps = sorted(last)
            return steps, [last[s] for s in steps], what


def plot_curves(run_dirs: list, names: list[str], out: str, log=print) -> None:
    """Draw each run's validation-loss curve (its training loss where it has none) into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run_dir, name in zip(run_dirs, names):
        if run_dir is None:
            log(f"apogee: note: {name} has no run directory (metrics.jsonl); not plotted")
            continue
        steps, values, what = validation_curve(run_dir)
        if not steps:
            log(f"apogee: note: {run_dir}/metrics.jsonl has no losses; not plotted")
            continue
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                  linestyle="-" if what == "validation loss" else "--", label=f"{name} ({what})")
        drawn += 1
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title("validation loss by run")
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    log(f"apogee: plotted {drawn} run(s) -> {out}")

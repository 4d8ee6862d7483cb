"""Loss curves of several runs in one PNG.

    .venv/bin/python -m launch.plot                                  # every runs/*/metrics.csv
    .venv/bin/python -m launch.plot teon_tp1 adamw_tp1 --out runs/teon_vs_adamw.png
    .venv/bin/python -m launch.plot runs/a/metrics.csv other/dir --smooth 20 --x tokens

A run is a name under runs/, a run directory, or a metrics.csv as launch/pretrain.py writes it. The
columns are read from each file's header: `step` is the x axis (or a tokens column, --x tokens), every
column whose name ends in `loss` is a curve (train_* thin and optionally smoothed, val_* with markers);
empty cells (steps without that measurement) are skipped. Prints each run's last values.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from launch import cli

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"


def find_metrics(item: str) -> Path:
    path = Path(item)
    for candidate in (path, path / "metrics.csv", RUNS / item / "metrics.csv"):
        if candidate.is_file():
            return candidate
    raise SystemExit(
        f"no metrics.csv for {item!r} (looked at {path}, {path / 'metrics.csv'}, "
        f"{RUNS / item / 'metrics.csv'})"
    )


def read_metrics(path: Path) -> Dict[str, List[Optional[float]]]:
    """Column -> values (None where the cell is empty), in file order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise SystemExit(f"{path}: empty file")
        columns: Dict[str, List[Optional[float]]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                cell = (row.get(name) or "").strip()
                try:
                    columns[name].append(float(cell) if cell else None)
                except ValueError:
                    columns[name].append(None)
    return columns


def smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average over `window` points (shorter at the start)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(columns: Dict[str, List[Optional[float]]], x_name: str, y_name: str):
    pairs = [
        (x, y)
        for x, y in zip(columns[x_name], columns[y_name])
        if x is not None and y is not None and math.isfinite(y)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def x_column(columns: Dict[str, list], want: str) -> str:
    if want == "step":
        if "step" not in columns:
            raise SystemExit(f"no 'step' column (columns: {', '.join(columns)})")
        return "step"
    for name in ("tokens", "consumed_tokens", "tokens_seen"):
        if name in columns:
            return name
    raise SystemExit(f"--x tokens: no tokens column (columns: {', '.join(columns)})")


def plot_runs(
    runs: Dict[str, Path],
    out: Path,
    smooth_window: int = 1,
    x: str = "step",
    title: Optional[str] = None,
    log_y: bool = False,
) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = []
    for i, (label, path) in enumerate(runs.items()):
        columns = read_metrics(path)
        xs_name = x_column(columns, x)
        losses = [c for c in columns if c.endswith("loss")]
        if not losses:
            raise SystemExit(f"{path}: no *loss column (columns: {', '.join(columns)})")
        color = colors[i % len(colors)]
        last = []
        for name in losses:
            xs, ys = series(columns, xs_name, name)
            if not ys:
                continue
            kind = name[: -len("loss")].rstrip("_") or "loss"
            if name.startswith("val"):
                ax.plot(xs, ys, "o-", color=color, markersize=3.5, linewidth=1.6, label=f"{label} {kind}")
            else:
                ax.plot(
                    xs,
                    smooth(ys, smooth_window),
                    "-",
                    color=color,
                    alpha=0.45,
                    linewidth=1.0,
                    label=f"{label} {kind}" + (f" (avg {smooth_window})" if smooth_window > 1 else ""),
                )
            last.append(f"{name} {ys[-1]:.4f} @ {xs_name} {xs[-1]:g}")
        summary.append(f"{label}: " + ", ".join(last))
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(runs) > 3 else 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser(prog="python -m launch.plot", description=__doc__)
    p.add_argument(
        "runs",
        nargs="*",
        help="run names under runs/, run directories or metrics.csv files (default: every run under runs/)",
    )
    p.add_argument("--out", default=str(RUNS / "loss_curves.png"), help="the PNG to write")
    p.add_argument("--smooth", type=int, default=1, help="moving average window of the train curves")
    p.add_argument("--x", default="step", choices=["step", "tokens"], help="the x axis")
    p.add_argument("--title", default=None, help='the plot\'s title (default: "N runs")')
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = p.parse_args(argv)
    items = args.runs or sorted(str(d.parent) for d in RUNS.glob("*/metrics.csv"))
    if not items:
        raise SystemExit(f"no runs given and none under {RUNS}")
    runs: Dict[str, Path] = {}
    for item in items:
        path = find_metrics(item)
        label = path.parent.name if path.name == "metrics.csv" else path.stem
        while label in runs:
            label += "'"
        runs[label] = path
    summary = plot_runs(runs, Path(args.out), args.smooth, args.x, args.title, args.log_y)
    print("\n".join(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

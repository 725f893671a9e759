"""PNG curves of a run (train/valid loss, main metric) and overlays of several runs.

Reads only `metrics.jsonl` (and `summary.json` for the metric's name), so a
run that is still going, or was killed, can be plotted too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from trainformer.rundir import RunDir  # noqa: E402


def _series(rows: list[dict[str, Any]], key: str, event: str, split: str | None = None,
            x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of `key` over the rows of one event (and split), in order of x."""
    pts = [(r[x], r[key]) for r in rows
           if r.get("event") == event and (split is None or r.get("split") == split)
           and isinstance(r.get(key), int | float) and x in r]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def main_metric(rows: list[dict[str, Any]], run_dir: Path) -> str | None:
    """The run's main metric: from its evaluation records, else summary.json."""
    for r in reversed(rows):
        if r.get("event") == "eval" and r.get("main_metric"):
            return str(r["main_metric"])
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            return json.loads(summary.read_text(encoding="utf-8")).get("main_metric")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write loss.png (train and valid loss vs step) and <metric>.png for one run.

    Returns the files written (none when the run has no metrics yet).
    """
    run_dir = Path(run_dir)
    out_dir = out_dir or run_dir / "plots"
    rows = RunDir(run_dir).read_metrics()
    written = []
    xs, ys = _series(rows, "loss", "train")
    vx, vy = _series(rows, "loss", "eval", "valid")
    if xs or vx:
        fig, ax = plt.subplots(figsize=(6, 4))
        if xs:
            ax.plot(xs, ys, label="train")
        if vx:
            ax.plot(vx, vy, marker="o", label="valid")
        ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out_dir / "loss.png"))
    metric = main_metric(rows, run_dir)
    if metric and metric != "loss":
        mx, my = _series(rows, metric, "eval", "valid")
        if mx:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(mx, my, marker="o")
            ax.set(xlabel="step", ylabel=metric, title=f"{run_dir.name}: valid {metric}")
            ax.grid(alpha=0.3)
            written.append(_save(fig, out_dir / f"{metric}.png"))
    return written


def plot_runs(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Overlay several runs: train loss vs step, valid metric vs step and vs minutes.

    Each run's main metric is used (runs of different tasks get separate curves).
    """
    runs = [(Path(d), RunDir(Path(d)).read_metrics()) for d in run_dirs]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, rows in runs:
        xs, ys = _series(rows, "loss", "train")
        if xs:
            ax.plot(xs, ys, label=d.name)
    ax.set(xlabel="step", ylabel="train loss", title="train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "train_loss.png"))
    for x, label, scale in (("step", "step", 1.0), ("elapsed_s", "minutes", 1 / 60)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = set()
        for d, rows in runs:
            metric = main_metric(rows, d) or "loss"
            names.add(metric)
            mx, my = _series(rows, metric, "eval", "valid", x=x)
            if mx:
                ax.plot([v * scale for v in mx], my, marker="o", label=f"{d.name} ({metric})")
        title = "valid " + "/".join(sorted(names))
        ax.set(xlabel=label, ylabel="/".join(sorted(names)), title=f"{title} vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"metric_vs_{label}.png"))
    return written

"""`trainformer plot RUN_DIR [RUN_DIR...]`: loss and metric curves as PNG files."""

from __future__ import annotations

from pathlib import Path

from trainformer.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="plot loss and metric curves of one or more runs",
        description="One run: loss.png and <metric>.png in RUN_DIR/plots. Several runs: overlays "
        "(train loss vs step, valid metric vs step and vs minutes) in --out.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the PNG files go (default: RUN_DIR/plots for one run, ./plots for several)")
    p.set_defaults(func=run)


def run(args) -> int:
    for run_dir in args.runs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory, or nothing logged yet)")
    from trainformer.training.plots import plot_run, plot_runs  # late: matplotlib is slow to import

    if len(args.runs) == 1:
        written = plot_run(args.runs[0], args.out)
    else:
        written = plot_runs(args.runs, args.out or Path("plots"))
    for path in written:
        print(path)
    return 0

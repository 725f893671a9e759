"""Freed memory kept for reuse (glibc, CPU runs): a recipe's training step with and without it.

glibc maps every block above 32 MB afresh and returns it when freed, so a CPU
step's largest tensors (the logits and their gradient) are faulted in and zeroed
again at every step. `trainformer.training.device.keep_freed_memory`, which a CPU
run's setup calls, turns that off. Each block of steps runs in a fresh process
(the setting is process-wide and cannot be undone), variants alternating; the
minor page faults of the timed steps are read from that process's own counters.
Medians.

    python benchmarks/speed/bench_allocator.py [--recipes translate-en-fr-60min translate-en-fr]
        [--rounds 4] [--out benchmarks/results/allocator]
"""

from __future__ import annotations

import json
from functools import partial

from trainformer.bench import recipe_steps as rs
from trainformer.errors import run_script
from trainformer.paths import REPO_ROOT
from trainformer.training import device


def set_reuse(on: bool) -> None:
    device.REUSE_FREED_MEMORY = on


def main() -> None:
    ap = rs.ab_parser(__doc__.splitlines()[0], REPO_ROOT / "benchmarks" / "results" / "allocator")
    ap.set_defaults(recipes=["translate-en-fr-60min", "translate-en-fr"], rounds=4)
    args = ap.parse_args()
    out = REPO_ROOT / "bench_out" / "bench_allocator"
    variants = {"freed memory kept": partial(set_reuse, True), "glibc default": partial(set_reuse, False)}
    rows = []
    for recipe in args.recipes:
        rows.append({"recipe": recipe, "processes": "fresh per block",
                     **rs.alternating_processes(recipe, out, variants, args.rounds)})
        print(json.dumps(rows[-1]), flush=True)
    result = rs.ab_result(args.rounds, steps=rows)
    lines = ["# Freed memory kept for reuse (CPU training)", "",
             f"Machine: {result['machine']}; torch {result['versions']['torch']}, {result['threads']} threads; "
             f"{result['date']}.", "", *rs.steps_markdown(rows, "allocator"), "",
             "Minor page faults per step (median over the timed blocks):", "",
             "| recipe | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    faults = {r["recipe"]: ["n/a" if f is None else f"{f:,}" for f in r["faults_per_step"].values()] for r in rows}
    lines += [f"| {recipe} | " + " | ".join(cells) + " |" for recipe, cells in faults.items()]
    rs.write_ab_result(args.out, "bench_allocator", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_script(main, "bench_allocator")

"""Freed memory kept for reuse (glibc, CPU runs): a recipe's training step with and without it.

glibc maps every block above 32 MB afresh and returns it when freed, so a CPU
step's largest tensors (the logits and their gradient) are faulted in and zeroed
again at every step. `trainformer.training.device.keep_freed_memory`, which a CPU
run's setup calls, turns that off. Each block of steps runs in a fresh process
(the setting is process-wide and cannot be undone), variants alternating; the
page faults per step are read from the process's own counters. Medians.

    python benchmarks/speed/bench_allocator.py [--recipes translate-en-fr-60min translate-en-fr]
        [--rounds 4] [--out benchmarks/results/allocator]
"""

from __future__ import annotations

import json
import resource
from functools import partial

from trainformer.bench import recipe_steps as rs
from trainformer.errors import run_script
from trainformer.paths import REPO_ROOT
from trainformer.training import device


def set_reuse(on: bool) -> None:
    device.REUSE_FREED_MEMORY = on


def faults_per_step(recipe: str, on: bool, steps: int = 10) -> int:
    """Minor page faults per training step of `recipe` after a warm-up, in this process."""
    set_reuse(on)
    trainer = rs.recipe_trainer(recipe, REPO_ROOT / "bench_out" / "bench_allocator")
    batches = iter(trainer.batches)
    rs._block(trainer, batches, 5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rs._block(trainer, batches, steps)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // steps


def _faults_in_child(recipe: str, on: bool, queue) -> None:
    queue.put(faults_per_step(recipe, on))


def child_faults(recipe: str, on: bool) -> int:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_faults_in_child, args=(recipe, on, queue))
    proc.start()
    got = queue.get()
    proc.join()
    return got


def main() -> None:
    ap = rs.ab_parser(__doc__.splitlines()[0], REPO_ROOT / "benchmarks" / "results" / "allocator")
    ap.set_defaults(recipes=["translate-en-fr-60min", "translate-en-fr"], rounds=4)
    args = ap.parse_args()
    out = REPO_ROOT / "bench_out" / "bench_allocator"
    variants = {"freed memory kept": partial(set_reuse, True), "glibc default": partial(set_reuse, False)}
    rows = []
    for recipe in args.recipes:
        row = {"recipe": recipe, "processes": "fresh per block",
               **rs.alternating_processes(recipe, out, variants, args.rounds)}
        row["faults_per_step"] = {name: child_faults(recipe, name == "freed memory kept") for name in variants}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = rs.ab_result(args.rounds, steps=rows)
    lines = ["# Freed memory kept for reuse (CPU training)", "",
             f"Machine: {result['machine']}; torch {result['versions']['torch']}, {result['threads']} threads; "
             f"{result['date']}.", "", *rs.steps_markdown(rows, "allocator"), "",
             "Minor page faults per step (10 steps after a warm-up, one more process per variant):", "",
             "| recipe | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    lines += [f"| {r['recipe']} | " + " | ".join(f"{r['faults_per_step'][v]:,}" for v in variants) + " |"
              for r in rows]
    rs.write_ab_result(args.out, "bench_allocator", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_script(main, "bench_allocator")

"""Freed memory kept for reuse (glibc, CPU runs): training steps and decoding with and without it.

glibc maps every block above its mmap threshold afresh and returns it when freed, so a CPU
step's largest tensors (the logits and their gradient; at decoding, rows x vocabulary) are
faulted in and zeroed again at every step. `trainformer.training.device.keep_freed_memory`,
which a CPU training run's setup calls, turns that off; the decoding rows ask whether
inference should do the same. Each block runs in a fresh process (the setting is
process-wide and cannot be undone), variants alternating; the minor page faults of the timed part are read from that process's
own counters. Medians.

- training: blocks of 50 steps of each recipe (2 threads, the machine's default);
- decoding (``--decode MODEL_DIR ...``): each model dir translates `--sentences` of its
  test split (spread over lengths) in chunks of 32 with beam 4, one thread, as
  `bench_interop.py` times its batched beam-4 column.

    python benchmarks/speed/bench_allocator.py [--recipes translate-en-fr-60min translate-en-fr]
        [--decode MODEL_DIR ...] [--sentences 512] [--rounds 4] [--out benchmarks/results/allocator]
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from trainformer.bench import recipe_steps as rs
from trainformer.bench.testset import (
    chunk_translator,
    length_chunks,
    spread_by_length,
    translation_test_set,
)
from trainformer.cli.common import require_positive
from trainformer.errors import run_script
from trainformer.paths import REPO_ROOT
from trainformer.training import device

BATCH, BEAM = 32, 4


def set_reuse(on: bool) -> None:
    device.REUSE_FREED_MEMORY = on


def decode_job(model_dir: str, sentences: int) -> tuple[float, int, int | None]:
    """In a fresh process: apply the variant's allocator setting, load the model, warm up on
    one chunk, time beam-4 translation of the chunks: (seconds, sentences, minor page faults)."""
    device.keep_freed_memory()  # a no-op in the "glibc default" variant
    torch.set_num_threads(1)
    translator = chunk_translator(model_dir)
    sources, _ = translation_test_set(Path(model_dir))
    parts = length_chunks(spread_by_length(sources, sentences), BATCH)
    translator.translate(parts[len(parts) // 2], beam=BEAM)
    faults, start = rs.minor_faults(), time.perf_counter()
    for part in parts:
        translator.translate(part, beam=BEAM)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, parts)), None if faults is None else rs.minor_faults() - faults


def decode_row(model_dir: str, variants: dict, rounds: int, sentences: int) -> dict:
    runs = rs.in_fresh_processes(partial(decode_job, model_dir, sentences), variants, rounds)
    speed = {k: round(statistics.median([n / s for s, n, _ in v]), 1) for k, v in runs.items()}
    faults = {k: [f // n for _, n, f in v if f is not None] for k, v in runs.items()}
    first, last = list(speed)[0], list(speed)[-1]
    return {"model_dir": model_dir, "sent_per_s": speed, "speedup": round(speed[first] / speed[last], 2),
            "faults_per_sentence": {k: (round(statistics.median(v)) if v else None) for k, v in faults.items()}}


def main() -> None:
    ap = rs.ab_parser(__doc__.splitlines()[0], REPO_ROOT / "benchmarks" / "results" / "allocator")
    ap.set_defaults(recipes=["translate-en-fr-60min", "translate-en-fr"], rounds=4)
    ap.add_argument("--decode", nargs="*", default=[], help="model dirs to time batched beam-4 decoding of")
    ap.add_argument("--sentences", type=int, default=512, help="test sentences per decoding block")
    args = ap.parse_args()
    require_positive(ap, args, "sentences", "rounds")
    out = REPO_ROOT / "bench_out" / "bench_allocator"
    variants = {"freed memory kept": partial(set_reuse, True), "glibc default": partial(set_reuse, False)}
    rows, decode_rows = [], []
    for recipe in args.recipes:
        rows.append({"recipe": recipe, "processes": "fresh per block",
                     **rs.alternating_processes(recipe, out, variants, args.rounds)})
        print(json.dumps(rows[-1]), flush=True)
    for model_dir in args.decode:
        decode_rows.append(decode_row(model_dir, variants, args.rounds, args.sentences))
        print(json.dumps(decode_rows[-1]), flush=True)
    result = rs.ab_result(args.rounds, steps=rows, decoding=decode_rows)
    lines = ["# Freed memory kept for reuse (CPU training and decoding)", "",
             f"Machine: {result['machine']}; torch {result['versions']['torch']}; {result['date']}.", ""]
    if rows:
        lines += [f"Training: {result['threads']} threads.", "", *rs.steps_markdown(rows, "allocator"), "",
                  "Minor page faults per step (median over the timed blocks):", "",
                  "| recipe | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for r in rows:
            lines.append(f"| {r['recipe']} | " + " | ".join(_count(f) for f in r["faults_per_step"].values()) + " |")
        lines.append("")
    if decode_rows:
        lines += [f"## Decoding: {args.sentences} test sentences, chunks of {BATCH}, beam {BEAM}, 1 thread", "",
                  "| model dir | " + " | ".join(f"{k} sent/s" for k in variants) + " | speed-up | "
                  + " | ".join(f"faults per sentence, {k}" for k in variants) + " |",
                  "|---|" + "---|" * (2 * len(variants) + 1)]
        for r in decode_rows:
            lines.append(f"| {r['model_dir']} | " + " | ".join(str(v) for v in r["sent_per_s"].values())
                         + f" | **{r['speedup']:.2f}x** | "
                         + " | ".join(_count(f) for f in r["faults_per_sentence"].values()) + " |")
    rs.write_ab_result(args.out, "bench_allocator", result, "\n".join(lines) + "\n")


def _count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


if __name__ == "__main__":
    run_script(main, "bench_allocator")

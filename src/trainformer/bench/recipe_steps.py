"""A recipe's own training step, timed in alternating blocks: the A/B frame of the speed scripts
that switch one implementation detail on and off (benchmarks/speed/bench_attention.py, bench_loss.py)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from trainformer.config import load_recipe
from trainformer.rundir import RunDir, machine_line, package_versions
from trainformer.tasks import build_task
from trainformer.training.trainer import Trainer


def recipe_trainer(recipe: str, out: Path) -> Trainer:
    """A set-up trainer of `recipe` (its data, model, optimizer and precision), ready to step."""
    cfg = load_recipe(recipe, ["train.progress=false"])
    trainer = Trainer(cfg, build_task(cfg), RunDir(out / recipe))
    trainer.setup()
    return trainer


def _block(trainer: Trainer, batches, steps: int) -> tuple[float, int]:
    """Seconds and tokens of `steps` training steps on the next batches of the stream."""
    accum = trainer.cfg.train.grad_accum
    micro = [[next(batches) for _ in range(accum)] for _ in range(steps)]
    start = time.perf_counter()
    for m in micro:
        trainer.train_step(m)
    return time.perf_counter() - start, sum(trainer.task.batch_tokens(b) for m in micro for b in m)


def alternating_blocks(trainer: Trainer, variants: dict[str, Callable[[], None]], rounds: int,
                       steps: int = 25) -> dict:
    """Steps/s and tokens/s of each variant (a callable that switches it on), in alternating blocks
    of `steps` steps on one model and one batch stream (so all see the same kind of batches);
    one warm-up block each, medians over `rounds`. The first variant is the candidate, the last
    the baseline: ``speedup`` = first / last in steps/s."""
    batches = iter(trainer.batches)
    for switch in variants.values():  # warm-up
        switch()
        _block(trainer, batches, steps)
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, switch in variants.items():
            switch()
            runs[name].append(_block(trainer, batches, steps))
    return _summary(runs, steps, trainer.precision.name)


def _summary(runs: dict[str, list[tuple[float, int]]], steps: int, precision: str) -> dict:
    """Median steps/s and tokens/s of each variant's (seconds, tokens) blocks; the speed-up of
    the first variant (the candidate) over the last (the baseline)."""
    steps_per_s = {k: round(statistics.median(steps / s for s, _ in v), 2) for k, v in runs.items()}
    first, last = list(runs)[0], list(runs)[-1]
    return {"precision": precision, "steps_per_block": steps, "steps_per_s": steps_per_s,
            "tokens_per_s": {k: round(statistics.median(t / s for s, t in v)) for k, v in runs.items()},
            "speedup": round(steps_per_s[first] / steps_per_s[last], 2)}


def _train_job(recipe: str, out: Path, warmup: int, steps: int) -> tuple[float, int, str, int | None]:
    """Set up the recipe's trainer, warm up, time `steps` steps: (seconds, tokens, precision,
    minor page faults of the timed steps or None where the OS does not report them)."""
    trainer = recipe_trainer(recipe, out)
    batches = iter(trainer.batches)
    _block(trainer, batches, warmup)
    faults = minor_faults()
    seconds, tokens = _block(trainer, batches, steps)
    return seconds, tokens, trainer.precision.name, None if faults is None else minor_faults() - faults


def minor_faults() -> int | None:
    """This process's minor page faults so far (None where `resource` does not exist)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _fresh_process(job: Callable[[], Any], switch: Callable[[], None], queue) -> None:
    """Switch the variant on, then run the job; its result, or its error (so the parent raises
    it instead of waiting forever), goes back through the queue."""
    try:
        switch()
        queue.put(job())
    except Exception as e:  # noqa: BLE001 - handed to the parent as it is
        queue.put(e)


def in_fresh_processes(job: Callable[[], Any], variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, list]:
    """`job()`'s results per variant, each run in a fresh process after the variant's switch,
    variants alternating (A, B, A, B, ...) for `rounds` rounds: no variant inherits the
    allocator, caches or memory layout another left behind. `job` and the switches must be
    picklable (top-level functions or partials of them)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results: dict[str, list] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, switch in variants.items():
            queue = ctx.Queue()
            proc = ctx.Process(target=_fresh_process, args=(job, switch, queue))
            proc.start()
            got = queue.get()
            proc.join()
            if isinstance(got, BaseException):
                raise got
            results[name].append(got)
    return results


def alternating_processes(recipe: str, out: Path, variants: dict[str, Callable[[], None]], rounds: int,
                          steps: int = 50, warmup: int = 10) -> dict:
    """As `alternating_blocks`, but every block runs in a fresh process (`in_fresh_processes`),
    each with its own warm-up. Also the median minor page faults per step of each variant
    (None where not reported)."""
    results = in_fresh_processes(partial(_train_job, recipe, out, warmup, steps), variants, rounds)
    runs = {name: [(seconds, tokens) for seconds, tokens, _, _ in r] for name, r in results.items()}
    faults = {name: [f // steps for *_, f in r if f is not None] for name, r in results.items()}
    precision = next(iter(results.values()))[0][2]
    return {**_summary(runs, steps, precision),
            "faults_per_step": {k: (round(statistics.median(v)) if v else None) for k, v in faults.items()}}


def steps_markdown(rows: list[dict], variant: str) -> list[str]:
    """Markdown lines of the step table of `alternating_blocks` / `alternating_processes` rows
    (each with its "recipe"); `variant` names the column of the switched detail."""
    lines = ["## The trainer's step on each recipe's batches (alternating blocks, medians)", "",
             f"| recipe | precision | processes | {variant} | steps/s | tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        processes = r.get("processes", "one")
        for k in r["steps_per_s"]:
            lines.append(f"| {r['recipe']} | {r['precision']} | {processes} | {k} | {r['steps_per_s'][k]} | "
                         f"{r['tokens_per_s'][k]:,} |")
        lines.append(f"| | | | **speed-up** | **{r['speedup']:.2f}x** | |")
    return lines


def ab_parser(description: str, out: Path) -> argparse.ArgumentParser:
    """The options every A/B step script takes: --recipes, --rounds, --out."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--recipes", nargs="*", default=["translate-en-fr", "translate-en-fr-60min"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=out)
    return ap


def ab_result(rounds: int, **parts) -> dict:
    """A result record: the machine, versions, threads, date and rounds, then `parts`."""
    return {"machine": machine_line(), "versions": package_versions(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "rounds": rounds, **parts}


def write_ab_result(out: Path, stem: str, result: dict, markdown: str) -> None:
    """OUT/STEM.json and OUT/STEM.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(f"wrote {out / f'{stem}.md'}")

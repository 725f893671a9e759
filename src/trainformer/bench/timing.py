"""Timing helpers shared by the benchmark sections: device sync, interleaving, summaries."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device` (synchronised on both ends)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    runs: dict[str, Callable[[], float]], steps: int, warmup: int,
    warmup_out: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Call each run in turn (a, b, a, b, ...) so background load hits all alike.

    Args:
        runs: name -> a callable that returns its own duration in seconds.
        steps: timed calls per run; warmup: untimed calls per run first.
        warmup_out: if given, filled with name -> the warm-up durations (compile time shows there).
    Returns:
        name -> the `steps` durations.
    """
    times: dict[str, list[float]] = {k: [] for k in runs}
    warm: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            (times if i >= warmup else warm)[name].append(run())
    if warmup_out is not None:
        warmup_out.update(warm)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, min and max of a list of durations (the median is the headline figure)."""
    if not seconds:
        raise ValueError("no timings to summarize")
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}

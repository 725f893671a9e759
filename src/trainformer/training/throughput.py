"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU, PaLM paper, Chowdhery et al. 2022).

MFU = model FLOPs per token x tokens per second / peak FLOP/s. On a GPU the
peak is the vendor's dense figure; a CPU has no reliable spec sheet, so we
measure a large matmul in the training dtype and keep the best figure this
machine has ever shown (``peak_flops.json`` in the user cache): another
process busy at start-up can only lower a measurement, and a low peak would
inflate MFU (a run once showed 96% against a start-up reading of half the
quiet peak).
"""

from __future__ import annotations

import functools
import json
import time

import torch

from trainformer.paths import cache_dir
from trainformer.rundir import atomic_write_text, cpu_name

# Dense (no sparsity) tensor-core peaks, FLOP/s, from NVIDIA's data sheets. fp32 = TF32,
# which the trainer enables on CUDA. More specific names come first.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """The spec-sheet peak of a GPU named `device_name` (None when not in the table)."""
    for key, peaks in GPU_PEAK_FLOPS:
        if key in device_name:
            return peaks.get(precision)
    return None


@functools.lru_cache(maxsize=8)
def measure_matmul_flops(dtype: torch.dtype, threads: int, seconds: float = 0.4, n: int = 1024) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul on the CPU over a few ~`seconds`/4 windows.

    The best window, not the mean: a peak is what the hardware can do, and a
    window disturbed by another process would otherwise lower it (and inflate MFU).
    `threads` is part of the answer's meaning (the caller's thread count).
    """
    gen = torch.Generator().manual_seed(0)  # never the global RNG: runs must not depend on this
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up: first call allocates and picks a kernel
    best = 0.0
    for _ in range(4):
        count, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 4:
                break
        best = max(best, 2.0 * n**3 * count / elapsed)
    return best


def peak_flops(device: torch.device, precision: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` in `precision`: spec sheet on CUDA, measured on CPU."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return cpu_peak_flops(dtype, torch.get_num_threads())


def cpu_peak_flops(dtype: torch.dtype, threads: int, seconds: float = 0.8) -> float:
    """The best matmul FLOP/s this CPU has shown in `dtype` on `threads` threads.

    Measures now (once per process) and remembers the maximum across runs in
    the user cache, so a start-up disturbed by another process does not
    lower the MFU denominator.
    """
    measured = measure_matmul_flops(dtype, threads, seconds)
    path = cache_dir() / "peak_flops.json"
    key = f"{cpu_name()} | {threads} threads | {str(dtype).removeprefix('torch.')}"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        known = {}
    stored = known.get(key) if isinstance(known, dict) else None
    stored = float(stored) if isinstance(stored, int | float) else 0.0
    best = max(measured, stored)
    if best > stored:
        try:
            old = known if isinstance(known, dict) else {}
            atomic_write_text(path, json.dumps({**old, key: best}, indent=2) + "\n")
        except OSError:
            pass  # a read-only cache costs accuracy of MFU, never the run
    return best


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the peak is unknown)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / peak


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def eta_seconds(
    step: int, max_steps: int, seconds_per_step: float, elapsed_s: float, max_minutes: float
) -> float:
    """Time left: to `max_steps` at the current pace, or to the wall-clock budget if nearer."""
    left = max(0, max_steps - step) * seconds_per_step
    if max_minutes > 0:
        left = min(left, max(0.0, max_minutes * 60 - elapsed_s))
    return left

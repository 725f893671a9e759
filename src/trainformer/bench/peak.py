"""Measured matmul throughput: the denominator of model FLOPs utilisation (MFU).

A CPU has no trustworthy spec sheet, so we time GEMMs in the same run as the
models: a large square one and ones shaped like the model's projections
(tokens x d_model @ d_model x d_ff), in fp32 and bf16. On CUDA the vendor's
dense peak (`trainformer.training.throughput.GPU_PEAK_FLOPS`) is reported too.
"""

from __future__ import annotations

import time

import torch

from trainformer.bench.timing import sync
from trainformer.training.precision import cpu_has_fast_bf16
from trainformer.training.throughput import gpu_peak_flops, measure_matmul_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_flops(
    device: torch.device, m: int, k: int, n: int, dtype: torch.dtype, reps: int = 3, min_s: float = 0.0
) -> float:
    """FLOP/s of (m x k) @ (k x n) in `dtype`: the best of `reps` timed calls after a warm-up.

    The best, not the median, because a peak is what the hardware can do;
    background load only ever makes a call slower. `min_s` repeats the call
    within one timing until that many seconds passed (short GEMMs on a GPU).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)  # never the global RNG
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    a @ b  # first call allocates and picks a kernel
    best = 0.0
    for _ in range(reps):
        count = 0
        sync(device)
        start = time.perf_counter()
        while True:
            a @ b
            count += 1
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = max(best, 2.0 * m * k * n * count / elapsed)
    return best


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in `dtype`, the best of `reps`."""
    return gemm_flops(device, n, n, n, dtype, reps)


def peak_shapes(device: torch.device, quick: bool, slow_bf16: bool) -> list[tuple[str, int, int, int]]:
    """(label, m, k, n) of the GEMMs to time.

    Full CPU: 2048^3 and the (4096 x 384) @ (384 x 1536) FFN GEMM of the
    6-layer d384 benchmark model at 16 x 256 tokens. CUDA adds GPT-2-small's
    (8192 x 768) @ (768 x 3072). Emulated bf16 (AVX2 CPUs, ~20x slower) and
    --quick use smaller sizes so the suite stays in minutes.
    """
    if device.type == "cuda":
        return [("square 8192", 8192, 8192, 8192), ("ffn 4096x384x1536", 4096, 384, 1536),
                ("gpt2 ffn 8192x768x3072", 8192, 768, 3072)]
    if quick and slow_bf16:
        return [("square 256", 256, 256, 256), ("ffn 256x384x1536", 256, 384, 1536)]
    if quick or slow_bf16:
        return [("square 512", 512, 512, 512), ("ffn 1024x384x1536", 1024, 384, 1536)]
    return [("square 2048", 2048, 2048, 2048), ("ffn 4096x384x1536", 4096, 384, 1536)]


def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """Measured GEMM FLOP/s per precision and shape, their best, and the spec peak on CUDA.

    Returns:
        {"gemms": [{"precision", "shape", "m", "k", "n", "flops"}...],
         "measured": {precision: best FLOP/s}, "spec": {precision: FLOP/s} (CUDA, known GPUs),
         "trainer_cpu_peak": {precision: FLOP/s} (CPU: the figure the trainer's MFU log uses),
         "notes": [str]}
    """
    slow_bf16 = device.type == "cpu" and not cpu_has_fast_bf16()
    reps = 2 if quick else 3
    min_s = 0.05 if device.type == "cuda" else 0.0
    gemms, notes = [], []
    for prec, dtype in DTYPES.items():
        for label, m, k, n in peak_shapes(device, quick, slow_bf16 and prec == "bf16"):
            flops = gemm_flops(device, m, k, n, dtype, reps, min_s)
            gemms.append({"precision": prec, "shape": label, "m": m, "k": k, "n": n, "flops": flops})
    measured = {p: max(g["flops"] for g in gemms if g["precision"] == p) for p in DTYPES}
    out: dict = {"gemms": gemms, "measured": measured, "notes": notes}
    if slow_bf16:
        notes.append("CPU without AVX512-BF16/AMX: bf16 matmuls are emulated (much slower than fp32); "
                     "bf16 GEMMs timed at small sizes, and CPU runs use fp32")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["spec"] = {p: gpu_peak_flops(name, p) for p in DTYPES}
        if out["spec"]["bf16"] is None:
            notes.append(f"no spec-sheet peak known for {name!r}; MFU uses the measured peak")
    else:
        threads = torch.get_num_threads()
        out["trainer_cpu_peak"] = {p: measure_matmul_flops(d, threads) for p, d in DTYPES.items()}
    return out


def mfu_peak(peaks: dict, precision: str) -> float:
    """The MFU denominator for `precision`: the spec peak on a known GPU, else the best measured GEMM.

    The best measured GEMM (not the square one alone) so MFU never exceeds
    what a plain matmul of some shape reached in this run.
    """
    spec = (peaks.get("spec") or {}).get(precision)
    return spec or peaks["measured"][precision]

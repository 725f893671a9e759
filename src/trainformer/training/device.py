"""Device, threads and seeding: the first things a run decides."""

from __future__ import annotations

import ctypes
import os
import platform
import random

import numpy as np
import torch

from trainformer.config import TrainConfig
from trainformer.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """A device name -> a torch.device, or a one-line error naming `key` (the option it came from).

    Args:
        name: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        local_rank: under torchrun, "auto"/"cuda" pick the GPU of this process.
        key: ``train.device`` for training, ``--device`` for the inference verbs.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} asked for but no CUDA device is visible; use cpu")
    try:
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
    except RuntimeError:
        raise ConfigError(f"{key}: expected cuda or cuda:N, got {name!r}") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(device)
    return device


REUSE_FREED_MEMORY = True  # a benchmark turns it off to compare
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Linux / glibc: serve every allocation from the heap and keep freed memory for reuse.

    glibc gives blocks above its largest mmap threshold (32 MB) their own mapping and
    returns it to the OS when they are freed, so the largest tensors of a CPU training
    step (the logits and their gradient, tokens x vocabulary) arrive as fresh pages at
    every step, each one faulted in and zeroed by the kernel. With mmap off and no
    trimming, a freed block is reused by the next step instead; the process keeps its
    peak memory rather than handing it back. Process-wide and not undone; returns
    whether it was applied (False elsewhere, or with `REUSE_FREED_MEMORY` off).
    """
    if not REUSE_FREED_MEMORY or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def set_threads(threads: int) -> None:
    """`train.threads` > 0 sets torch's intra-op threads (CPU); 0 leaves the default."""
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); deterministic kernels as the config says.

    Deterministic mode uses `warn_only=True`: an op without a deterministic
    kernel warns instead of stopping the run. The setting is process-wide, so
    it is set either way (a previous run in the same process must not leak).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def setup_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """Threads, seed and device for a run, in that order; on the CPU, freed memory kept for reuse."""
    set_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cpu":
        keep_freed_memory()
    return device

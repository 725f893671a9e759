"""Device, threads and seeding: the first things a run decides."""

from __future__ import annotations

import os
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
    """Threads, seed and device for a run, in that order."""
    set_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    return resolve_device(cfg.device, local_rank)

"""What every inference class does the same way: autocast at the chosen precision, length batches."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from trainformer.data.batching import length_sorted_batches
from trainformer.training.precision import build_precision


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` ('auto': bf16 only where it is fast)."""
    return build_precision(precision, device).autocast()


def inference_batches(lengths: Sequence[int], budget: int) -> list[np.ndarray]:
    """Indices grouped by similar length so that examples x longest <= `budget` (input order kept per length)."""
    if not len(lengths):
        return []
    return length_sorted_batches(np.asarray(lengths), budget, np.arange(len(lengths)))

"""What every inference class does the same way: autocast at the chosen precision, length batches."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from trainformer.data.batching import length_sorted_batches
from trainformer.training.precision import build_precision

# Decoding on the CPU under 'auto': below this many rows per step (batch x beam) the step's
# GEMMs are too small for bf16 to pay for autocast's casts of every activation, and fp32 is
# the faster (batch 1: greedy 2x, beam 4 1.2x; batch 32: bf16 1.2-1.3x; bench_interop --bf16).
CPU_BF16_MIN_ROWS = 16


def inference_autocast(
    device: torch.device, precision: str, rows: int | None = None
) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device`.

    'auto' is bf16 only where it is fast: on a CPU with native bf16 (or a GPU),
    and for CPU decoding (`rows`: the rows one decoding step works on) only from
    `CPU_BF16_MIN_ROWS` rows up. An explicit precision is used as given.
    """
    if precision == "auto" and device.type == "cpu" and rows is not None and rows < CPU_BF16_MIN_ROWS:
        precision = "fp32"
    return build_precision(precision, device).autocast()


def inference_batches(lengths: Sequence[int], budget: int) -> list[np.ndarray]:
    """Indices grouped by similar length so that examples x longest <= `budget` (input order kept per length)."""
    if not len(lengths):
        return []
    return length_sorted_batches(np.asarray(lengths), budget, np.arange(len(lengths)))

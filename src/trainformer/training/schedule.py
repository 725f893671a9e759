"""Learning-rate schedules: warm-up then inverse square root, cosine, linear or constant.

Each is a multiplier of `optim.lr` as a function of the optimizer step, used
through `LambdaLR`, whose state (the step) is saved in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainformer.config import OptimConfig


def lr_multiplier(
    cfg: OptimConfig, max_steps: int, budget_used: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """The multiplier of `cfg.lr` after `step` optimizer steps (step 0 = the first update).

    - inverse_sqrt: linear warm-up to 1, then sqrt(warmup / step) (Vaswani et al.
      2017; fairseq's `inverse_sqrt`);
    - cosine: warm-up, then half a cosine down to `min_lr_ratio` at `max_steps`;
    - linear: warm-up, then a straight line down to `min_lr_ratio` at `max_steps`;
    - constant: warm-up, then 1.

    `budget_used` (optional) returns the share of the time budget spent since the
    warm-up ended, in [0, 1]; cosine and linear then decay by whichever of steps and
    time is further along, so the decay ends when the budget does.
    """
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio
    kind = cfg.schedule

    def multiplier(step: int) -> float:
        step += 1  # the first update uses a non-zero learning rate
        if step <= warmup:
            return step / warmup
        if kind == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / step)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if budget_used is not None:
            progress = max(progress, min(1.0, budget_used()))
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)  # linear

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    max_steps: int,
    budget_used: Callable[[], float] | None = None,
) -> LambdaLR:
    """A LambdaLR over `optimizer` following `cfg.schedule` (a closure: its state is the step)."""
    return LambdaLR(optimizer, lr_multiplier(cfg, max_steps, budget_used))

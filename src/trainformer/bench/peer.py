"""What the Hugging Face peers of the benchmarks share: the usual HF learning-rate recipe
fitted to a wall-clock budget."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


class BudgetedLinearSchedule:
    """HF's `get_linear_schedule_with_warmup` for a time budget instead of a step count.

    Linear warm-up over `warmup` steps, then a linear decay that reaches 0 at the
    step where `minutes` of training will end, estimated once from the time the
    first `probe` steps took (until then the decay has no end in sight).

    Call `step(train_s)` after every optimizer step with the training seconds so far.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, minutes: float, probe: int = 20):
        self.warmup, self.budget_s, self.probe = warmup, 60.0 * minutes, probe
        self.total = 10**9  # the step where the decay ends
        self.steps = 0
        self.scheduler = LambdaLR(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def step(self, train_s: float) -> None:
        self.scheduler.step()
        self.steps += 1
        if self.steps == self.probe:
            self.total = max(self.warmup + 1, int(self.budget_s / (train_s / self.steps)))

"""The counters of a run, saved in every checkpoint so that a resumed run continues them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Counters saved in every checkpoint (plain numbers only)."""

    step: int = 0  # optimizer updates done (skipped non-finite steps do not count)
    tokens: int = 0  # non-padding tokens processed, all ranks
    elapsed_s: float = 0.0  # wall time of the run, across resumes
    train_s: float = 0.0  # time inside training steps (excludes evaluation, checkpoints)
    bad_steps: int = 0  # non-finite steps skipped in total
    best_value: float | None = None
    best_step: int = 0
    evals_since_best: int = 0
    decay_start_s: float | None = None  # elapsed_s when warm-up ended (optim.decay_horizon: budget)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

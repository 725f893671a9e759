"""What the trainer reports while it trains: the metrics window and the records it becomes.

`MetricsWindow` sums the optimizer steps since the last train record: loss
and loss tokens on the device (so a step needs no host sync), tokens
processed on the host (counted from the CPU batches), and the training time
(evaluation and checkpoints excluded). Every ``train.log_every`` steps one
all-reduce and one host read turn it into `WindowTotals`, and `TrainLog`
writes the train record (token-mean loss, lr, tokens/s, MFU, ETA) to
metrics.jsonl and the progress bar, as it does skipped steps and evaluations.

    window = MetricsWindow(device)
    window.add_tokens(task.batch_tokens(batch))       # for each micro-batch
    window.add_step(loss_sum, loss_tokens)            # for each optimizer step taken
    with window.paused():                             # evaluation, checkpoints
        ...
    log.train(window.totals(env, comm_device), step=..., ...)
    window.reset()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from trainformer.config import TrainConfig
from trainformer.rundir import RunDir
from trainformer.training import distributed as D
from trainformer.training.progress import Progress
from trainformer.training.throughput import eta_seconds, mfu


@dataclass(frozen=True)
class WindowTotals:
    """A metrics window summed over all ranks."""

    loss_sum: float  # summed per-token loss of the window's steps
    loss_tokens: float  # the tokens that carried that loss
    tokens: int  # non-padding tokens processed
    steps: int  # optimizer steps taken (this rank's count: every rank takes the same)
    seconds: float  # training time: wall time less evaluation and checkpoints

    @property
    def loss(self) -> float:
        """Token-mean loss: every token weighs the same, whatever batch it came in."""
        return self.loss_sum / max(self.loss_tokens, 1.0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


class MetricsWindow:
    """The steps since the last train record.

    Args:
        device: where the loss sums live (the training device: adding to them never syncs).
        clock: seconds, monotonic (tests give a fake one).
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.monotonic):
        self.device = device
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Start an empty window now."""
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_tokens = torch.zeros((), device=self.device)
        self.tokens = 0
        self.steps = 0
        self.start = self.clock()
        self.paused_s = 0.0  # evaluation / checkpoint time inside the window

    def add_tokens(self, n: int) -> None:
        """Count the non-padding tokens of a micro-batch (a host int: counted on the CPU batch)."""
        self.tokens += n

    def add_step(self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor) -> None:
        """Add an optimizer step that was taken: its summed loss and loss tokens (this rank's)."""
        self.loss_sum += loss_sum
        self.loss_tokens += loss_tokens
        self.steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside this block is not training time (tokens/s leaves it out)."""
        start = self.clock()
        yield
        self.paused_s += self.clock() - start

    def seconds(self) -> float:
        """Training time of the window so far."""
        return max(1e-9, self.clock() - self.start - self.paused_s)

    def totals(self, env: D.DistEnv, comm_device: torch.device) -> WindowTotals:
        """The window summed over ranks: one all-reduce, one host read."""
        tokens = torch.tensor(float(self.tokens), device=self.device)
        sums = torch.stack([self.loss_sum, self.loss_tokens, tokens]).to(comm_device)
        loss_sum, loss_tokens, tokens = D.all_reduce(sums, env).tolist()
        return WindowTotals(loss_sum, loss_tokens, int(tokens), self.steps, self.seconds())


class TrainLog:
    """The run's records (metrics.jsonl, TensorBoard) and lines (a tqdm bar, or log lines); rank 0 only.

    Args:
        run_dir: where metrics.jsonl goes.
        train: the `train` config: progress bar, max_steps / max_minutes for the ETA.
        step: the step the run starts (or resumes) at.
        enabled: this process writes and prints (rank 0).
        flops_per_token: model FLOPs per token, for MFU.
        peak: the device's peak FLOP/s (None: MFU unknown).
        world_size: processes: tokens/s is over all of them, MFU per device.
    """

    def __init__(self, run_dir: RunDir, train: TrainConfig, step: int, enabled: bool,
                 flops_per_token: float, peak: float | None, world_size: int):
        self.train_cfg = train
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        # Under a wall-clock budget the step count is unknown: the bar counts steps without a
        # total (tqdm's own ETA would assume max_steps) and the postfix shows the budget's ETA.
        total = None if train.max_minutes else train.max_steps
        self.progress = Progress(run_dir, total, step, bar=train.progress, enabled=enabled)

    def log(self, record: dict[str, Any]) -> None:
        """Any record (data, compile, eval ...) into metrics.jsonl."""
        self.progress.log(record)

    def print(self, line: str) -> None:
        """A line below the bar (stderr)."""
        self.progress.print(line)

    def advance(self) -> None:
        self.progress.advance()

    def end_bar(self) -> None:
        self.progress.end_bar()

    def close(self) -> None:
        self.progress.close()

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU of all ranks' `tokens_per_s` (each device does its share)."""
        return mfu(self.flops_per_token, tokens_per_s / self.world_size, self.peak)

    def train(self, totals: WindowTotals, step: int, elapsed_s: float, lr: float, grad_norm: float,
              epoch: int | None) -> dict[str, Any]:
        """Log the train record of a window; returns it."""
        t = self.train_cfg
        record = {
            "event": "train",
            "step": step,
            "loss": totals.loss,
            "lr": lr,
            "tokens_per_s": totals.tokens_per_s,
            "mfu": self.mfu(totals.tokens_per_s),
            "grad_norm": grad_norm,
            "elapsed_s": elapsed_s,
            "eta_s": eta_seconds(step, t.max_steps, totals.seconds_per_step, elapsed_s, t.max_minutes),
        }
        if epoch is not None:
            record["epoch"] = epoch
        self.log(record)
        return record

    def bad_step(self, step: int, loss: float, grad_norm: float, in_a_row: int) -> None:
        """A step skipped for a non-finite loss or gradients."""
        self.log({"event": "bad_step", "step": step, "loss": loss, "grad_norm": grad_norm, "in_a_row": in_a_row})
        self.print(f"step {step}: non-finite loss/gradients (loss {loss}); step skipped")

    def compiled(self, step: int, seconds: float) -> None:
        """The first step under torch.compile (its time is compilation, kept out of tokens/s)."""
        self.log({"event": "compile", "step": step, "compile_s": seconds})
        self.print(f"torch.compile: first step took {seconds:.1f}s")

    def evaluation(self, split: str, step: int, elapsed_s: float, train_s: float, main_metric: str,
                   metrics: dict[str, Any], **extra: Any) -> None:
        """An evaluation's record, and its line: ``valid @ step 200: bleu 31.2, loss 2.01``."""
        self.log({"event": "eval", "split": split, "step": step, "elapsed_s": elapsed_s, "train_s": train_s,
                  "main_metric": main_metric, **extra, **metrics})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        self.print(f"{split} @ step {step}: {shown}")

"""What a run shows and records while it trains: a tqdm bar or log lines, metrics.jsonl,
and TensorBoard events when TensorBoard is installed. Rank 0 only."""

from __future__ import annotations

import sys
import time
from typing import Any

from trainformer.rundir import RunDir
from trainformer.training.throughput import format_duration


def _tensorboard_writer(path):
    """A SummaryWriter when tensorboard is importable, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or tensorboard's own import errors
        return None
    try:
        return SummaryWriter(log_dir=str(path / "tensorboard"))
    except Exception:
        return None


def describe(record: dict[str, Any]) -> str:
    """A short human line for a train record: loss, lr, tokens/s, MFU, ETA."""
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"{record['tokens_per_s'] / 1000:.1f}k tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    return " | ".join(parts)


class Progress:
    """The run's display and metric log. Does nothing on ranks other than 0."""

    def __init__(self, run_dir: RunDir, total_steps: int | None, initial_step: int, bar: bool, enabled: bool):
        self.run_dir = run_dir
        self.enabled = enabled
        self.bar = None
        self._last: dict[str, Any] | None = None  # the newest train record, for the ETA countdown
        self._last_time = 0.0
        self.tb = _tensorboard_writer(run_dir.path) if enabled else None
        if enabled and bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self.bar is None:
            return
        if self._last is not None and self._last.get("eta_s") is not None:
            # the ETA counts down between train records (they come every log_every steps)
            left = max(0.0, self._last["eta_s"] - (time.monotonic() - self._last_time))
            self.bar.set_postfix_str(describe({**self._last, "eta_s": left}), refresh=False)
        self.bar.update(steps)

    def print(self, line: str) -> None:
        """A line of text that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` to metrics.jsonl (and TensorBoard); show train records."""
        if not self.enabled:
            return
        self.run_dir.log(record)
        self._tensorboard(record)
        if record.get("event") != "train":
            return
        if self.bar is not None:
            self._last, self._last_time = record, time.monotonic()
            self.bar.set_postfix_str(describe(record), refresh=False)
        else:
            self.print(f"step {record['step']} | {describe(record)}")

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self.tb is None or "step" not in record:
            return
        prefix = record.get("split") or record.get("event", "train")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def end_bar(self) -> None:
        """Close the bar (training is over); later lines are printed plainly."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_bar()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

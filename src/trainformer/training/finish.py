"""The end of a run: which weights it keeps, model/, summary.json, plots.

While training, `track_best` counts each valid score against the best so far
(the trainer saves that model for ``train.keep_best`` and stops after
``train.early_stopping`` evaluations without a better one). When training
stops, `RunEnd.run`:

1. evaluates on valid and writes a checkpoint, unless the last step did;
2. averages the last ``train.average_last`` checkpoints, and keeps the mean
   only if it scores at least as well on valid as the last weights;
3. with ``train.keep_best``, loads the best weights seen on valid if they
   scored better than those in hand;
4. evaluates on test, writes model/ and summary.json, plots the metrics, and
   prints the task's samples.

A run stopped by a signal only checkpoints and writes its summary: a
scheduler's grace period is short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainformer.config import Config
from trainformer.modeldir import save_model_dir
from trainformer.rundir import RunDir
from trainformer.training import checkpoint as ckpt
from trainformer.training import distributed as D
from trainformer.training.state import TrainState
from trainformer.training.task import Task
from trainformer.training.throughput import mfu


def better(new: dict[str, float], old: dict[str, float], main: str, higher_is_better: bool) -> bool:
    """`new` scores at least as well as `old` on the `main` metric (True when either lacks it)."""
    if main not in old or main not in new:
        return True
    a, b = float(new[main]), float(old[main])
    return a >= b if higher_is_better else a <= b


def track_best(state: TrainState, value: float, higher_is_better: bool) -> bool:
    """Count a valid score against the best so far; True if it is the new best.

    A finite score strictly better than ``state.best_value`` (or the first one)
    becomes the best: its value and step are kept and ``evals_since_best``
    restarts at 0. Any other score is one more evaluation without a better one.
    """
    best = state.best_value
    if math.isfinite(value) and (best is None or (value > best if higher_is_better else value < best)):
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        return True
    state.evals_since_best += 1
    return False


def has_split(task: Task, cfg: Config, split: str) -> bool:
    """Whether the task can evaluate on `split` (a task without `has_split`: test needs data.test_size)."""
    has = getattr(task, "has_split", None)
    if callable(has):
        return bool(has(split))
    return split != "test" or cfg.data.test_size > 0


@dataclass(frozen=True)
class RunFacts:
    """What summary.json says about the run's set-up."""

    params: int
    precision: str
    device: str
    world_size: int
    flops_per_token: float  # for MFU
    peak: float | None  # the device's peak FLOP/s (None: MFU unknown)


@dataclass
class RunEnd:
    """The end of one run.

    Args:
        cfg, task, run_dir: the run's config, task and directory.
        module: the trained model (own parameter names; under FSDP2 the sharded root:
            loading and saving its full state are collectives, so every rank runs the end).
        env: this process's rank and the world size.
        state: the run's counters (step, tokens, times, the best on valid).
        facts: the set-up that summary.json reports.
        evaluate: ``(split, **extra) -> metrics``, the trainer's: it logs an eval record and,
            for valid without extras, tracks the best.
        save_checkpoint: writes checkpoints/step-N of the current step.
        on_eval_ranks: ``fn(model)`` run where evaluation runs (eval mode, RNG untouched);
            rank 0's answer on every rank.
        sync_elapsed: brings ``state.elapsed_s`` up to now.
        print: a line for the user (rank 0).
    """

    cfg: Config
    task: Task
    run_dir: RunDir
    module: nn.Module
    env: D.DistEnv
    state: TrainState
    facts: RunFacts
    evaluate: Callable[..., dict[str, float]]
    save_checkpoint: Callable[[], Any]
    on_eval_ranks: Callable[[Callable[[nn.Module], Any]], Any]
    sync_elapsed: Callable[[], None]
    print: Callable[[str], None]

    def run(self, reason: str, valid: dict[str, float], evaluated: bool, checkpointed: bool) -> dict[str, Any]:
        """Finish a run that stopped for `reason`; returns the summary (also in summary.json).

        Args:
            valid: the last valid metrics.
            evaluated, checkpointed: the current step was evaluated on valid / checkpointed.
        """
        s = self.state
        if reason == "signal":  # be quick: a scheduler's grace period is short
            if not checkpointed:
                self.save_checkpoint()
            self.print(f"stopped by signal at step {s.step}; --resume {self.run_dir.path} continues")
            return self.write_summary(reason, {}, {}, 0)
        self.print(f"stopping at step {s.step}: {reason}")
        if not evaluated:
            valid = self.evaluate("valid")
        if not checkpointed:
            self.save_checkpoint()
        valid, averaged = self.keep_average(valid)
        kept_best = bool(self.cfg.train.keep_best and self.restore_best(valid))
        if kept_best:
            valid, averaged = self.evaluate("valid", best_step=s.best_step), 0
        test = self.evaluate("test") if has_split(self.task, self.cfg, "test") else {}
        self.write_model_dir()
        summary = self.write_summary(reason, valid, test, averaged, kept_best)
        self.plot()
        for line in self.on_eval_ranks(self.task.samples) or []:
            self.print(line)
        return summary

    def better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        return better(new, old, self.task.main_metric, self.task.higher_is_better)

    def average_last(self) -> int:
        """Load the mean of the last ``train.average_last`` checkpoints; returns how many (0: none)."""
        n = self.cfg.train.average_last
        paths = ckpt.list_checkpoints(self.run_dir.checkpoints)[-n:] if n > 1 else []
        if len(paths) < 2:
            return 0
        D.load_full_model_state(self.module, ckpt.average_checkpoints(paths))
        self.print(f"averaged the weights of {len(paths)} checkpoints: {paths[0].name}..{paths[-1].name}")
        return len(paths)

    def keep_average(self, valid: dict[str, float]) -> tuple[dict[str, float], int]:
        """Average the last checkpoints if that scores at least as well on valid as the last
        weights (whose scores are `valid`); returns the valid scores in hand and how many were averaged."""
        averaged = self.average_last()
        if not averaged:
            return valid, 0
        mean_valid = self.evaluate("valid", averaged=averaged)
        if self.better(mean_valid, valid):
            return mean_valid, averaged
        # averaging over a still-fast-improving stretch can lose; keep the last weights
        last = ckpt.list_checkpoints(self.run_dir.checkpoints)[-1]
        D.load_full_model_state(self.module, ckpt.load_weights(last / ckpt.WEIGHTS))
        self.print(f"the averaged weights score lower on valid; kept {last.name}")
        return valid, 0

    def restore_best(self, valid: dict[str, float]) -> bool:
        """Load ``checkpoints/best`` (train.keep_best) if it scored better on valid than the
        weights in hand, whose scores are `valid`; True if it did."""
        s, main = self.state, self.task.main_metric
        path = self.run_dir.checkpoints / ckpt.BEST
        if s.best_value is None or main not in valid or not (path / ckpt.WEIGHTS).is_file():
            return False
        if self.better(valid, {main: s.best_value}):
            return False  # the last weights are the best (or as good)
        D.load_full_model_state(self.module, ckpt.load_weights(path / ckpt.WEIGHTS))
        self.print(f"keeping the weights of step {s.best_step}, best on valid ({main} {s.best_value:.4g} "
                   f"against {float(valid[main]):.4g} at the end)")
        return True

    def write_model_dir(self) -> None:
        """model/: weights, config.json and the task's files, published in one rename."""
        model_state = D.full_model_state(self.module)
        if self.env.is_main:
            final = self.run_dir.model_dir
            tmp = ckpt.fresh_tmp_dir(final)
            save_model_dir(model_state, self.cfg, tmp)  # the one writer of model/ weights and config.json
            self.task.save_artifacts(tmp)
            ckpt.publish_dir(tmp, final)
        D.barrier(self.env)

    def summary(self, reason: str, valid: dict, test: dict, averaged: int, kept_best: bool = False) -> dict[str, Any]:
        """What summary.json holds (docs/run-dir.md)."""
        self.sync_elapsed()
        s, f = self.state, self.facts
        return {
            "name": self.cfg.name, "task": self.cfg.task, "stop_reason": reason,
            "steps": s.step, "tokens": s.tokens, "wall_time_s": s.elapsed_s, "train_time_s": s.train_s,
            "tokens_per_s": s.tokens / s.train_s if s.train_s else 0.0,
            "mfu": mfu(f.flops_per_token, s.tokens / max(s.train_s, 1e-9) / f.world_size, f.peak),
            "params": f.params, "precision": f.precision, "device": f.device,
            "world_size": f.world_size, "bad_steps": s.bad_steps, "averaged_checkpoints": averaged,
            "main_metric": self.task.main_metric, "best": {"step": s.best_step, "value": s.best_value},
            "valid": valid, "test": test, "kept_best": kept_best,
        }

    def write_summary(self, reason: str, valid: dict, test: dict, averaged: int,
                      kept_best: bool = False) -> dict[str, Any]:
        summary = self.summary(reason, valid, test, averaged, kept_best)
        self.run_dir.write_summary(summary)
        return summary

    def plot(self) -> None:
        """plots/ from metrics.jsonl (rank 0); a plotting problem must not cost a finished run its summary."""
        if not self.env.is_main:
            return
        from trainformer.training.plots import plot_run

        try:
            plot_run(self.run_dir.path)
        except Exception as e:
            self.print(f"plots: skipped ({type(e).__name__}: {e})")

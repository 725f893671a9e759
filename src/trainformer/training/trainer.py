"""The one training loop, shared by every task.

One step, top to bottom: pull the step's micro-batches, count their loss
tokens (all ranks), forward under autocast + backward of loss_sum / tokens for
each micro-batch (gradient sync on the last only), clip, skip the step if
anything is non-finite, optimizer, schedule. Then log / evaluate / checkpoint
when due. `.item()` is called only on log steps (plus one host read per step
for the non-finite check).

    trainer = Trainer(cfg, task, RunDir(Path("runs/x")))
    summary = trainer.fit()            # or fit(resume=True) to continue
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainformer.config import Config, save_config
from trainformer.errors import ConfigError, UserError
from trainformer.rundir import RunDir, atomic_write_text
from trainformer.training import checkpoint as ckpt
from trainformer.training import distributed as D
from trainformer.training.device import setup_device
from trainformer.training.finish import RunEnd, RunFacts, track_best
from trainformer.training.metrics_log import MetricsWindow, TrainLog
from trainformer.training.optim import build_optimizer, clip_gradients
from trainformer.training.precision import build_precision
from trainformer.training.schedule import build_scheduler
from trainformer.training.state import TrainState
from trainformer.training.task import Batch, Task
from trainformer.training.throughput import peak_flops
from trainformer.training.wrapping import apply_activation_checkpointing, compile_model


class Trainer:
    """Trains `task`'s model as `cfg` says, writing everything into `run_dir`.

    Args:
        cfg: the whole resolved config (the trainer reads `train`, `optim`, `parallel`).
        task: data, model, loss and metric (see `trainformer.training.task.Task`).
        run_dir: where config, metrics, checkpoints and the final model go.
        model: train this model instead of ``task.build_model()`` (e.g. a pruned one, which
            config.json alone cannot build); ``init_from`` still loads into it.
        loss: ``(model, batch) -> (summed loss, tokens)`` instead of ``task.loss`` (e.g.
            distillation from a teacher, `trainformer.compression.distill.Distillation`).
    """

    def __init__(self, cfg: Config, task: Task, run_dir: RunDir, model: nn.Module | None = None,
                 loss: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.cfg = cfg
        self.task = task
        self._given_model = model
        self.loss = loss or task.loss
        self.env = D.env_from_torchrun()
        self.device = setup_device(cfg.train, self.env.local_rank)
        D.init_process_group(self.env, cfg.parallel, self.device)
        # gloo reduces CPU tensors, NCCL device tensors
        nccl = self.env.distributed and D.resolve_backend(cfg.parallel.backend, self.device) == "nccl"
        self.comm_device = self.device if nccl else torch.device("cpu")
        self.run_dir = run_dir
        run_dir.is_main = self.env.is_main
        self.precision = build_precision(cfg.train.precision, self.device)
        if self.device.type == "cuda" and not cfg.train.deterministic:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x fp32 on Ampere and later
        self.state = TrainState()
        self._clock = time.monotonic()  # elapsed_s was last brought up to date at this time
        self._step_clock = 0.0  # elapsed_s at the last optimizer step, agreed by all ranks
        self._signal: int | None = None
        self._early_stop = False
        self._last_ckpt_step = -1
        self._last_eval_step = -1
        self._bad_in_a_row = 0
        self.valid_metrics: dict[str, float] = {}
        self.window = MetricsWindow(self.device)  # the steps since the last train record
        self.log: TrainLog | None = None  # metrics.jsonl and the progress bar, from fit() on

    # ------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------

    def _prepare_run_dir(self, resume: bool) -> None:
        """Write config.yaml (resolved after task.setup) and env.json; keep env.json on resume."""
        if self.env.is_main:
            if resume and (self.run_dir.path / "env.json").is_file():
                self.run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.run_dir.path / "config.yaml")
            else:
                self.run_dir.create(self.cfg)
        D.barrier(self.env)

    def _build_model(self, resume: bool) -> None:
        """Model on its device, optionally fine-tuned from `init_from`, then AC, DDP/FSDP, compile."""
        cfg = self.cfg
        model = self._given_model if self._given_model is not None else self.task.build_model()
        if cfg.init_from and not resume:
            missing, skipped = ckpt.load_pretrained(model, Path(cfg.init_from))
            self._print(f"init_from {cfg.init_from}: {len(missing)} new tensors, {len(skipped)} skipped")
        model.to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = float(self.task.flops_per_token(model))
        if cfg.train.activation_checkpointing and apply_activation_checkpointing(model) == 0:
            warnings.warn("train.activation_checkpointing: the model has no `layers` to wrap", stacklevel=2)
        wrapped = D.wrap_model(model, cfg.parallel, self.env, self.device, self.precision.name)
        self.fsdp = self.env.distributed and cfg.parallel.strategy == "fsdp"
        self.module: nn.Module = model  # own names; for FSDP2 the sharded root itself
        self.sync_model = wrapped  # what gradient_sync talks to (DDP / FSDP)
        self.model = compile_model(wrapped) if cfg.train.compile else wrapped

    def _build_optimization(self) -> None:
        self.optimizer = build_optimizer(self.module, self.cfg.optim)  # after FSDP: DTensor params
        budget = self._budget_used if self.cfg.optim.decay_horizon == "budget" else None
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps, budget)
        self.scaler = self.precision.grad_scaler()

    def setup(self, resume: bool = False) -> Path | None:
        """Everything before the first step; returns the checkpoint resumed from, if any."""
        # The CPU peak is measured first, while no tokenizer or loader threads are busy.
        peak = peak_flops(self.device, self.precision.name, self.precision.dtype) if self.env.is_main else None
        self.task.setup(self.run_dir.path, self.env.rank, self.env.world_size)
        self._prepare_run_dir(resume)
        self._build_model(resume)
        self._build_optimization()
        self.batches = self.task.train_batches()
        if self.cfg.train.max_epochs and self._epoch() is None:
            raise ConfigError(
                "train.max_epochs: this task's batches do not report an epoch; use train.max_steps"
            )
        latest = ckpt.latest_checkpoint(self.run_dir.checkpoints) if resume else None
        if resume and latest is None:
            self._print(f"resume: no complete checkpoint in {self.run_dir.checkpoints}; starting at step 0")
        if latest is not None:
            self._restore(latest)
        self.peak = self._record_peak(peak) if self.env.is_main else None
        return latest

    def _record_peak(self, peak: float | None) -> float | None:
        """Write the MFU denominator into env.json (one key per device and precision)."""
        env_path = self.run_dir.path / "env.json"
        try:
            env = json.loads(env_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return peak
        key = f"{self.device.type}-{self.precision.name}"
        if peak and env.get("peak_flops", {}).get(key) != peak:
            env["peak_flops"] = {**env.get("peak_flops", {}), key: peak}
            atomic_write_text(env_path, json.dumps(env, indent=2) + "\n")
        return peak

    # ------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------

    def _restore(self, path: Path) -> None:
        """Continue exactly from a checkpoint: weights, optimizer, schedule, data order, RNG."""
        state = ckpt.load_state(path)
        D.load_full_model_state(self.module, ckpt.load_weights(path / ckpt.WEIGHTS))
        D.load_full_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.state = TrainState.from_dict(state["train"])  # before the lr: budget decay reads it
        self._step_clock = self.state.elapsed_s
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_lr_from_config()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._last_ckpt_step = self.state.step  # (metrics are not saved: the end re-evaluates)
        ranks = state["ranks"]
        if len(ranks) != self.env.world_size:
            self._print(f"resume: checkpoint written by {len(ranks)} process(es), now "
                        f"{self.env.world_size}: data order and RNG do not continue exactly")
        mine = ranks[self.env.rank % len(ranks)]
        self.batches.load_state_dict(mine["batches"])
        ckpt.restore_rng(mine["rng"])  # last: building the model above consumed random numbers
        self._print(f"resumed from {path} (step {self.state.step})")

    def _apply_lr_from_config(self) -> None:
        """Let `optim.lr` overrides win on resume (LambdaLR restores the old base rates)."""
        lr = self.cfg.optim.lr
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        step = self.scheduler.last_epoch
        for group, fn in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * fn(step)

    def _budget_used(self) -> float:
        """Share of train.max_minutes spent since warm-up ended (0 during warm-up).

        The scheduler asks only after warm-up; its first call starts the clock of
        the decay; the start is saved in checkpoints, so a resumed run
        continues the same decay.
        """
        s, now = self.state, self._step_clock
        if s.decay_start_s is None:
            s.decay_start_s = now
        return (now - s.decay_start_s) / max(1e-9, 60 * self.cfg.train.max_minutes - s.decay_start_s)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N (every rank takes part; rank 0 writes). Returns its path on rank 0."""
        model_state = D.full_model_state(self.module)
        optim_state = D.full_optimizer_state(self.module, self.optimizer)
        self._sync_elapsed()
        mine = {"rng": ckpt.capture_rng(), "batches": ckpt.to_plain(self.batches.state_dict())}
        ranks = D.all_gather_object(mine, self.env)
        # Tokens of the unlogged window are counted too: a resumed run restarts the window.
        pending = D.all_reduce(torch.tensor(float(self.window.tokens), device=self.comm_device), self.env)
        path = None
        if self.env.is_main:
            state = {
                "train": {**asdict(self.state), "tokens": self.state.tokens + int(pending.item())},
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ranks": ranks,
                "world_size": self.env.world_size,
            }
            root = self.run_dir.checkpoints
            path = ckpt.save_checkpoint(root, self.state.step, model_state, state, self.cfg)
            protect = [root / ckpt.step_dir_name(self.state.best_step)] if self.state.best_value is not None else []
            keep = max(self.cfg.train.keep_last, self.cfg.train.average_last)
            ckpt.prune_checkpoints(root, keep, protect)
        self._last_ckpt_step = self.state.step
        self._last_ckpt_time = time.monotonic()
        D.barrier(self.env)
        return path

    # ------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------

    def _loss_tokens(self, batch: Batch) -> int | None:
        """Tokens carrying loss in a batch, known before the forward pass (None if unknown)."""
        n = self.task.loss_tokens(batch)  # Task's default counts `labels` != -100
        return None if n is None else int(n)

    def _global_loss_tokens(self, micro: list[Batch]) -> torch.Tensor | float | None:
        """Loss tokens of the whole step on all ranks: the divisor that makes accumulation exact."""
        counts = [self._loss_tokens(b) for b in micro]
        if any(c is None for c in counts):
            return None
        if not self.env.distributed:
            return float(max(1, sum(counts)))
        total = torch.tensor(float(sum(counts)), device=self.comm_device)
        D.all_reduce(total, self.env)  # stays on device: no host sync
        return total.clamp_min(1.0).to(self.device)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _rescale_grads(self, local_tokens: torch.Tensor) -> None:
        """Fallback when loss tokens cannot be counted up front: divide the summed gradients."""
        total = local_tokens.detach().to(self.comm_device).clone()
        D.all_reduce(total, self.env)
        factor = self.env.world_size / max(1.0, total.item())  # a float also scales DTensor grads
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _forward_backward(self, micro: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of a step; returns this rank's (loss sum, loss tokens).

        Each micro-batch's summed loss is scaled by world_size / (tokens of the
        step on all ranks): DDP/FSDP average over ranks, so the update equals one
        big batch's token-mean loss whatever the split into micro-batches.
        """
        total = self._global_loss_tokens(micro)
        scale = self.env.world_size / total if total is not None else 1.0
        loss_sum = torch.zeros((), device=self.device)
        n_tokens = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            self.window.add_tokens(self.task.batch_tokens(batch))  # CPU tensors: no device sync
            batch = self._to_device(batch)
            with D.gradient_sync(self.sync_model, enabled=i == len(micro) - 1):
                with self.precision.autocast():
                    part_sum, part_tokens = self.loss(self.model, batch)
                loss = part_sum.float() * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += part_sum.detach().float()
            n_tokens += part_tokens.detach().float()
        if total is None:
            self._rescale_grads(n_tokens)
        return loss_sum, n_tokens

    def _optimizer_step(self, loss_sum: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Clip and step unless the loss or the gradients are non-finite; returns (stepped, norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.module.parameters(), self.cfg.optim.clip_grad)
        bad = (~(torch.isfinite(norm) & torch.isfinite(loss_sum))).float()
        clock = torch.tensor(self.state.elapsed_s + time.monotonic() - self._clock, device=bad.device)
        agreed = torch.stack([bad, clock]).to(self.comm_device)
        D.all_reduce(agreed, self.env, op="max")  # every rank skips, or none; one clock for the lr
        # The one host read per step: skipping must be decided on the host.
        bad_flag, self._step_clock = agreed.tolist()
        ok = not bad_flag
        if ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()  # lowers the loss scale after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        return ok, norm

    def train_step(self, micro: list[Batch]) -> bool:
        """One optimizer step over `micro` (grad_accum micro-batches); False if it was skipped."""
        self.model.train()
        start = time.monotonic()
        loss_sum, n_tokens = self._forward_backward(micro)
        ok, norm = self._optimizer_step(loss_sum)
        self._last_norm = norm.detach()
        if ok:
            self.window.add_step(loss_sum, n_tokens)
        else:
            self._last_bad = (loss_sum, n_tokens)
        self.state.train_s += time.monotonic() - start
        return ok

    # ------------------------------------------------------------------
    # Logging, evaluation, stopping
    # ------------------------------------------------------------------

    def _print(self, line: str) -> None:
        """A line for the user, rank 0 only: below the progress bar once fit() has one."""
        if self.env.is_main:
            if self.log is not None:
                self.log.print(line)
            else:
                print(line, flush=True)

    def _sync_elapsed(self) -> None:
        now = time.monotonic()
        self.state.elapsed_s += now - self._clock
        self._clock = now

    def _epoch(self) -> int | None:
        """Epochs completed = the epoch of the next batch, from the iterator's state.

        An iterator that moves to the next epoch only when asked for its next
        batch reports (epoch, position == batches per epoch) at an epoch's end;
        that counts as done when the iterator has a length.
        """
        state = self.batches.state_dict()
        epoch = state.get("epoch", getattr(self.batches, "epoch", None))
        if epoch is None:
            return None
        position = state.get("position")
        try:
            per_epoch = len(self.batches)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = 0
        if position is not None and per_epoch and position >= per_epoch:
            epoch += 1
        return int(epoch)

    def _log_train(self) -> None:
        """The window's train record (its sums reduced over ranks: the only .item() calls); a new window."""
        totals = self.window.totals(self.env, self.comm_device)  # one host sync
        self.state.tokens += totals.tokens
        self._sync_elapsed()
        self.log.train(totals, self.state.step, self.state.elapsed_s, self.scheduler.get_last_lr()[0],
                       self._last_norm.item(), self._epoch())
        self.window.reset()

    def _on_bad_step(self) -> None:
        """Record a skipped non-finite step; stop after `max_bad_steps` in a row."""
        self._bad_in_a_row += 1
        self.state.bad_steps += 1
        loss_sum, n_tokens = self._last_bad
        loss = (loss_sum / n_tokens.clamp_min(1.0)).item()
        self.log.bad_step(self.state.step, loss, self._last_norm.item(), self._bad_in_a_row)
        if self._bad_in_a_row >= self.cfg.train.max_bad_steps:
            last = ckpt.latest_checkpoint(self.run_dir.checkpoints)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise UserError(
                f"training diverged: {self._bad_in_a_row} non-finite steps in a row after step "
                f"{self.state.step} (train.max_bad_steps); {where}. Lower optim.lr or raise "
                f"optim.warmup_steps, then --resume {self.run_dir.path}"
            )

    def _on_eval_ranks(self, fn):
        """Run `fn(model)` in eval mode where it must run (rank 0, or every rank under FSDP
        whose forward needs all ranks), with RNG untouched; rank 0's answer on every rank.

        Forking the RNG keeps training independent of how often we evaluate.
        """
        result = None
        if self.fsdp or self.env.is_main:
            rng = ckpt.capture_rng()
            model = self.module
            model.eval()
            try:
                with torch.no_grad(), self.precision.autocast():
                    result = fn(model)
            finally:
                model.train()
                ckpt.restore_rng(rng)
        return D.broadcast_object(result, self.env)

    def evaluate(self, split: str = "valid", **extra: Any) -> dict[str, float]:
        """Evaluate on `split`, log it, and (for valid) track the best model and early stopping."""
        with self.window.paused():
            metrics = self._on_eval_ranks(lambda m: self.task.evaluate(m, split))
            main = self.task.main_metric
            if main not in metrics:
                raise RuntimeError(f"{type(self.task).__name__}.evaluate({split!r}) returned no {main!r}")
            self._sync_elapsed()
            self.log.evaluation(split, self.state.step, self.state.elapsed_s, self.state.train_s, main,
                                metrics, **extra)
            if split == "valid" and not extra:
                self._last_eval_step = self.state.step
                self.valid_metrics = metrics
                self._track_best(float(metrics[main]))
        return metrics

    def _track_best(self, value: float) -> None:
        """Save the model as checkpoints/best when `value` is the best on valid; count down early stopping."""
        s = self.state
        if track_best(s, value, self.task.higher_is_better):
            model_state = D.full_model_state(self.module)
            if self.env.is_main:
                info = {"step": s.step, "metric": self.task.main_metric, "value": value}
                ckpt.save_best(self.run_dir.checkpoints, model_state, info)
            D.barrier(self.env)
            return
        patience = self.cfg.train.early_stopping
        if patience and s.evals_since_best >= patience:
            self._early_stop = True
            self._print(f"early stopping: {patience} evaluations without a better {self.task.main_metric}")

    def _stop_reason(self) -> str | None:
        """Why training should stop now (the same answer on every rank), or None."""
        t = self.cfg.train
        self._sync_elapsed()
        local = [self._signal is not None, t.max_minutes > 0 and self.state.elapsed_s >= 60 * t.max_minutes]
        signalled, out_of_time = self._agree(local)
        if signalled:
            return "signal"
        if self.state.step >= t.max_steps:
            return "max_steps"
        if out_of_time:
            return "max_minutes"
        if t.max_epochs and (self._epoch() or 0) >= t.max_epochs:
            return "max_epochs"
        if self._early_stop:
            return "early_stopping"
        return None

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Any rank's True is every rank's True (clocks and signals differ between processes)."""
        if not self.env.distributed:
            return flags
        tensor = torch.tensor(flags, dtype=torch.float32, device=self.comm_device)
        return [bool(v) for v in D.all_reduce(tensor, self.env, op="max").tolist()]

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        if t.ckpt_every and self.state.step % t.ckpt_every == 0:
            return True
        if t.ckpt_every_minutes > 0:
            return self._agree([time.monotonic() - self._last_ckpt_time >= 60 * t.ckpt_every_minutes])[0]
        return False

    def _after_step(self) -> None:
        t = self.cfg.train
        step = self.state.step
        if step % t.log_every == 0:
            self._log_train()
        if t.eval_every and step % t.eval_every == 0:
            self.evaluate("valid")
        if self._checkpoint_due():
            with self.window.paused():
                self.save_checkpoint()

    # ------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._signal = signum

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _train_loop(self) -> str:
        """Steps until a stop condition; returns why it stopped."""
        batches = iter(self.batches)
        accum = self.cfg.train.grad_accum
        first = True
        while (reason := self._stop_reason()) is None:
            try:
                micro = [next(batches) for _ in range(accum)]
            except StopIteration:
                return "data_exhausted"
            start = time.monotonic()
            if not self.train_step(micro):
                self._on_bad_step()
                continue
            if first and self.cfg.train.compile:
                self.log.compiled(self.state.step + 1, time.monotonic() - start)
                self.window.reset()  # keep compile time out of tokens/s
            first = False
            self._bad_in_a_row = 0
            self.state.step += 1
            self.log.advance()
            self._after_step()
        return reason

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until max_steps / max_minutes / max_epochs / early stopping / a signal.

        Args:
            resume: continue from the newest complete checkpoint in the run dir.

        Returns:
            The summary also written to summary.json.
        """
        self.setup(resume)
        self._clock = self._last_ckpt_time = time.monotonic()
        report = self.task.data_report()
        self.log = TrainLog(self.run_dir, self.cfg.train, self.state.step, self.env.is_main,
                            self.flops_per_token, self.peak, self.env.world_size)
        if report:
            self.log.log({"event": "data", "step": self.state.step, **report})
        self.window.reset()
        old_handlers = self._install_signal_handlers()
        try:
            reason = self._train_loop()
            self.log.end_bar()
            return self._finish(reason)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.log.close()
            self._release_wrappers()

    def _release_wrappers(self) -> None:
        """Drop the DDP / compile wrappers now, while the process group still exists:
        a DDP module freed after `destroy_process_group` hangs its process at exit
        (seen with gloo, PyTorch 2.13). `self.module` keeps the trained weights."""
        self.model = self.sync_model = self.module
        gc.collect()

    # ------------------------------------------------------------------
    # The end of a run
    # ------------------------------------------------------------------

    def _finish(self, reason: str) -> dict[str, Any]:
        """The window's last record, then the end of the run (`training/finish.py`): the weights
        kept, model/, summary.json, plots, samples. Returns the summary."""
        if self.window.steps:
            self._log_train()
        self.log.end_bar()  # evaluation and samples print below a finished bar
        facts = RunFacts(self.n_params, self.precision.name, str(self.device), self.env.world_size,
                         self.flops_per_token, self.peak)
        end = RunEnd(self.cfg, self.task, self.run_dir, self.module, self.env, self.state, facts,
                     evaluate=self.evaluate, save_checkpoint=self.save_checkpoint,
                     on_eval_ranks=self._on_eval_ranks, sync_elapsed=self._sync_elapsed, print=self._print)
        return end.run(reason, self.valid_metrics, evaluated=self._last_eval_step == self.state.step,
                       checkpointed=self._last_ckpt_step == self.state.step)

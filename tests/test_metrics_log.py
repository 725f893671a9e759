"""The trainer's metrics window and the records it becomes (training/metrics_log.py)."""

from __future__ import annotations

import pytest
import torch

from helpers_toy import toy_config
from trainformer.rundir import RunDir
from trainformer.training.distributed import DistEnv
from trainformer.training.metrics_log import MetricsWindow, TrainLog, WindowTotals

CPU = torch.device("cpu")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window_of_three_steps() -> tuple[MetricsWindow, FakeClock]:
    """3 steps, 2 s of training each, one 4 s evaluation in between; 2 micro-batches a step."""
    clock = FakeClock()
    w = MetricsWindow(CPU, clock)
    steps = [  # (loss sum, loss tokens, tokens of each micro-batch)
        (10.0, 5.0, (30, 20)),
        (40.0, 10.0, (60, 40)),
        (6.0, 3.0, (25, 25)),
    ]
    for i, (loss_sum, loss_tokens, micro) in enumerate(steps):
        for n in micro:
            w.add_tokens(n)
        clock.now += 2.0
        w.add_step(torch.tensor(loss_sum), torch.tensor(loss_tokens))
        if i == 1:
            with w.paused():
                clock.now += 4.0
    return w, clock


def test_window_sums_tokens_and_leaves_evaluation_time_out_of_tokens_per_s():
    w, _ = window_of_three_steps()
    totals = w.totals(DistEnv(), CPU)
    assert totals.tokens == 200 and totals.steps == 3
    assert totals.seconds == pytest.approx(6.0)  # 10 s of wall time less the 4 s evaluation
    assert totals.tokens_per_s == pytest.approx(200 / 6)
    assert totals.seconds_per_step == pytest.approx(2.0)


def test_window_loss_is_the_token_mean_not_the_mean_of_step_means():
    w, _ = window_of_three_steps()
    totals = w.totals(DistEnv(), CPU)
    assert totals.loss == pytest.approx(56 / 18)  # step means 2, 4, 2 would average 2.67
    assert WindowTotals(0.0, 0.0, 0, 0, 1.0).loss == 0.0  # no loss tokens: no division by zero


def test_reset_starts_an_empty_window_at_the_current_time():
    w, clock = window_of_three_steps()
    w.reset()
    w.add_tokens(7)
    clock.now += 0.5
    totals = w.totals(DistEnv(), CPU)
    assert (totals.tokens, totals.steps, totals.loss_sum) == (7, 0, 0.0)
    assert totals.seconds == pytest.approx(0.5)


def make_log(tmp_path, *overrides, peak=1e12, world_size=1) -> TrainLog:
    cfg = toy_config(list(overrides))
    return TrainLog(RunDir(tmp_path), cfg.train, step=0, enabled=True, flops_per_token=1e6, peak=peak,
                    world_size=world_size)


def test_train_record_has_mfu_per_device_and_the_eta_at_the_window_pace(tmp_path):
    log = make_log(tmp_path, "train.max_steps=100", world_size=2)
    totals = WindowTotals(loss_sum=30.0, loss_tokens=10.0, tokens=4000, steps=4, seconds=2.0)
    record = log.train(totals, step=20, elapsed_s=50.0, lr=1e-3, grad_norm=0.5, epoch=None)
    assert record["loss"] == 3.0 and record["tokens_per_s"] == 2000.0
    assert record["mfu"] == pytest.approx(1e6 * 1000 / 1e12)  # 2,000 tok/s over 2 devices
    assert record["eta_s"] == pytest.approx(80 * 0.5)  # 80 steps left at 0.5 s a step
    assert "epoch" not in record
    assert RunDir(tmp_path).read_metrics() == [record]


def test_train_record_eta_stops_at_the_time_budget_and_mfu_is_unknown_without_a_peak(tmp_path):
    log = make_log(tmp_path, "train.max_steps=100000", "train.max_minutes=1", peak=None)
    totals = WindowTotals(1.0, 1.0, 100, 1, 1.0)
    record = log.train(totals, step=10, elapsed_s=45.0, lr=1e-3, grad_norm=0.5, epoch=2)
    assert record["eta_s"] == pytest.approx(15.0) and record["mfu"] is None and record["epoch"] == 2


def test_bad_step_is_recorded_and_shown(tmp_path, capsys):
    log = make_log(tmp_path)
    log.bad_step(step=7, loss=float("nan"), grad_norm=float("inf"), in_a_row=2)
    (record,) = RunDir(tmp_path).read_metrics()
    assert record["event"] == "bad_step" and record["step"] == 7 and record["in_a_row"] == 2
    assert "step 7: non-finite loss/gradients (loss nan); step skipped" in capsys.readouterr().err

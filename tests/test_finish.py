"""The end of a run (training/finish.py): which weights are kept, and the signal path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers_toy import toy_config
from trainformer.rundir import RunDir
from trainformer.training import checkpoint as ckpt
from trainformer.training.distributed import DistEnv
from trainformer.training.finish import RunEnd, RunFacts, better, track_best
from trainformer.training.state import TrainState


@pytest.mark.parametrize("higher, new, old, expected", [
    (True, 0.6, 0.5, True), (True, 0.4, 0.5, False), (True, 0.5, 0.5, True),
    (False, 0.4, 0.5, True), (False, 0.6, 0.5, False), (False, 0.5, 0.5, True),
])
def test_better_follows_the_metric_direction_and_ties_count_as_better(higher, new, old, expected):
    assert better({"m": new}, {"m": old}, "m", higher) is expected


def test_better_without_the_metric_on_either_side_is_true():
    assert better({"other": 1.0}, {"m": 2.0}, "m", True)
    assert better({"m": 1.0}, {}, "m", False)


@pytest.mark.parametrize("higher, scores, new_best, best", [
    (True, [30.0, 32.0, 31.0, 32.0], [True, True, False, False], 32.0),  # an equal score is not a new best
    (False, [3.0, 2.5, 2.7, float("nan")], [True, True, False, False], 2.5),  # NaN never is
    (False, [float("nan"), 4.0], [False, True], 4.0),  # not even as the first score
])
def test_track_best_keeps_the_best_score_in_the_metric_direction(higher, scores, new_best, best):
    state = TrainState()
    seen = []
    for step, value in enumerate(scores, 1):
        state.step = step
        seen.append(track_best(state, value, higher))
    assert seen == new_best
    last_best = max(i for i, new in enumerate(new_best, 1) if new)
    assert (state.best_value, state.best_step) == (best, last_best)
    assert state.evals_since_best == len(scores) - last_best


def linear(value: float) -> nn.Linear:
    m = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def run_end(tmp_path, module, higher: bool, state: TrainState, *overrides, evaluate=None, events=None):
    events = [] if events is None else events
    task = SimpleNamespace(main_metric="score", higher_is_better=higher, samples=lambda m: [],
                           save_artifacts=lambda d: None, has_split=lambda s: False)
    run_dir = RunDir(tmp_path)
    run_dir.checkpoints.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(list(overrides))
    facts = RunFacts(params=4, precision="fp32", device="cpu", world_size=1, flops_per_token=24.0, peak=None)
    return RunEnd(cfg, task, run_dir, module, DistEnv(), state, facts,
                  evaluate=evaluate or (lambda split, **extra: events.append(("eval", split, extra)) or {}),
                  save_checkpoint=lambda: events.append(("checkpoint",)),
                  on_eval_ranks=lambda fn: fn(module), sync_elapsed=lambda: None,
                  print=lambda line: events.append(("print", line)))


@pytest.mark.parametrize("higher, at_end, keeps_best", [
    (True, 0.4, True), (True, 0.6, False), (True, 0.5, False),  # as good at the end: the last weights stay
    (False, 0.6, True), (False, 0.4, False),
])
def test_restore_best_loads_the_best_weights_only_when_they_scored_better(tmp_path, higher, at_end, keeps_best):
    ckpt.save_best(tmp_path / "checkpoints", linear(1.0).state_dict(), {"step": 4})
    state = TrainState(step=10, best_value=0.5, best_step=4)
    module = linear(2.0)  # the last weights
    end = run_end(tmp_path, module, higher, state)
    assert end.restore_best({"score": at_end}) is keeps_best
    assert module.weight.flatten().tolist() == [1.0 if keeps_best else 2.0] * 4


def test_restore_best_without_a_best_checkpoint_keeps_the_last_weights(tmp_path):
    module = linear(2.0)
    end = run_end(tmp_path, module, True, TrainState(step=10, best_value=0.9, best_step=4))
    assert end.restore_best({"score": 0.1}) is False
    assert module.weight.flatten().tolist() == [2.0] * 4


@pytest.mark.parametrize("higher, mean_score, kept", [(True, 0.7, True), (True, 0.3, False), (False, 0.3, True)])
def test_averaged_weights_are_kept_only_if_they_score_at_least_as_well(tmp_path, higher, mean_score, kept):
    cfg = toy_config()
    for step, value in ((2, 1.0), (4, 3.0)):
        ckpt.save_checkpoint(tmp_path / "checkpoints", step, linear(value).state_dict(), {}, cfg)
    module = linear(3.0)
    seen = []

    def evaluate(split, **extra):
        seen.append((split, extra, module.weight[0, 0].item()))
        return {"score": mean_score}

    end = run_end(tmp_path, module, higher, TrainState(step=4), "train.average_last=2", evaluate=evaluate)
    valid, averaged = end.keep_average({"score": 0.5})
    assert seen == [("valid", {"averaged": 2}, 2.0)]  # evaluated with the mean of 1 and 3 loaded
    assert averaged == (2 if kept else 0)
    assert valid == {"score": mean_score if kept else 0.5}
    assert module.weight.flatten().tolist() == [2.0 if kept else 3.0] * 4


def test_a_signal_only_checkpoints_and_writes_the_summary(tmp_path):
    events = []
    state = TrainState(step=7, tokens=700, train_s=2.0, elapsed_s=3.0)
    end = run_end(tmp_path, linear(1.0), True, state, events=events)
    summary = end.run("signal", {"score": 0.5}, evaluated=False, checkpointed=False)
    assert [e[0] for e in events] == ["checkpoint", "print"]  # no evaluation, no model/
    assert "--resume" in events[1][1]
    assert summary["stop_reason"] == "signal" and summary["valid"] == {} and summary["tokens_per_s"] == 350.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert not (tmp_path / "model").exists()

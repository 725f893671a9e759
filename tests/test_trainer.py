"""The training loop: precision, optimizer, schedules, loss, exact accumulation,
non-finite steps, stopping rules, end-of-run artifacts, CLI verbs."""

from __future__ import annotations

import json
import math
import platform
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers_toy import ToyBatches, ToyModel, ToyTask, collate, make_examples, toy_config
from trainformer.cli import main as cli_main
from trainformer.errors import ConfigError, UserError
from trainformer.rundir import RunDir
from trainformer.training import precision as P
from trainformer.training import wrapping
from trainformer.training.loss import cross_entropy_sum
from trainformer.training.optim import build_optimizer, clip_gradients, param_groups
from trainformer.training.schedule import build_scheduler, lr_multiplier
from trainformer.training.throughput import measure_matmul_flops
from trainformer.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Runs set threads / deterministic mode process-wide; keep other tests unaffected."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def make_trainer(tmp_path, *overrides, task_cls=ToyTask, name="run"):
    cfg = toy_config(list(overrides))
    return Trainer(cfg, task_cls(cfg), RunDir(tmp_path / name))


def metrics(run_path, event, split=None):
    rows = RunDir(run_path).read_metrics()
    return [r for r in rows if r.get("event") == event and (split is None or r.get("split") == split)]


# ----------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------


def test_precision_auto_follows_cpu_bf16_support(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert P.resolve_precision("auto", cpu) == "fp32"
    assert P.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        P.resolve_precision("fp16", cpu)


def test_autocast_and_scaler_follow_precision():
    x, lin = torch.randn(2, 4), torch.nn.Linear(4, 3)
    with P.Precision("bf16", torch.device("cpu")).autocast():
        assert lin(x).dtype == torch.bfloat16
    with P.Precision("fp32", torch.device("cpu")).autocast():
        assert lin(x).dtype == torch.float32
    assert P.Precision("bf16", torch.device("cpu")).grad_scaler() is None
    assert P.Precision("fp32", torch.device("cpu")).grad_scaler() is None


# ----------------------------------------------------------------------------
# Loss, optimizer, schedules, clipping
# ----------------------------------------------------------------------------


def test_loss_sums_in_fp32_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    total, n = cross_entropy_sum(logits.bfloat16(), labels, label_smoothing=0.1)
    assert total.dtype == torch.float32 and n.item() == 7
    real = labels != -100
    expected = F.cross_entropy(logits.bfloat16().float()[real], labels[real], label_smoothing=0.1,
                               reduction="sum")
    assert torch.allclose(total, expected, atol=1e-5)
    changed = logits.clone()
    changed[~real] = 100.0  # logits at padded positions must not matter
    assert torch.allclose(cross_entropy_sum(changed, labels)[0], cross_entropy_sum(logits, labels)[0])
    # label smoothing by hand: (1 - eps) * nll + eps * mean over classes of -log p
    logp = logits.log_softmax(-1)[real]
    nll = -logp.gather(1, labels[real].unsqueeze(1)).squeeze(1)
    manual = (0.9 * nll + 0.1 * -logp.mean(-1)).sum()
    assert torch.allclose(cross_entropy_sum(logits, labels, 0.1)[0], manual, atol=1e-5)


@pytest.mark.parametrize("kernel", ["C", "PyTorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_blockwise_training_loss_equals_autograd_cross_entropy(dtype, eps, kernel, monkeypatch):
    """The CPU training loss (gradient written in the forward: by the C kernel, rows split over
    2 threads, or by PyTorch ops row block by row block) gives the loss and logit gradients of
    autograd's F.cross_entropy; blocks of 3 rows over 11 rows leave a partial last block, and
    ignored rows get no gradient."""
    from trainformer.nn import native

    monkeypatch.setattr("trainformer.training.loss.ROWS_PER_BLOCK", 3)
    monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
    torch.set_num_threads(2)  # conftest resets it
    if kernel == "C" and not native.available():
        pytest.skip("no C compiler")
    if kernel == "PyTorch":
        monkeypatch.setattr(native, "_enabled", False)
    torch.manual_seed(0)
    base = (torch.randn(11, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, (11,))
    labels[[2, 7]] = -100
    ours, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    total, n = cross_entropy_sum(ours, labels, eps)
    expected = F.cross_entropy(ref.float(), labels, reduction="sum", label_smoothing=eps, ignore_index=-100)
    (total / n).backward(retain_graph=True)
    (expected / n).backward()
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-5)
    assert ours.grad.dtype == dtype and not ours.grad[[2, 7]].any()
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: one more rounding of a gradient below 1 / n
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), atol=tol, rtol=0)
    with torch.no_grad():  # evaluation takes the plain path: same number
        torch.testing.assert_close(cross_entropy_sum(base, labels, eps)[0], expected.detach(), atol=1e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()  # the saved gradient was scaled in place: no second backward, even retained


def test_training_loss_rejects_a_label_outside_the_vocabulary():
    """A label past the vocabulary is an error naming it and its row (the C kernel checks what
    it would otherwise write out of bounds; PyTorch's gather raises its own)."""
    from trainformer.nn import native

    if not native.available():
        pytest.skip("no C compiler")
    labels = torch.tensor([1, -100, 50, 3])
    with pytest.raises(ValueError, match="label 50 of row 2 is not a class of the 50 logits"):
        cross_entropy_sum(torch.randn(4, 50, requires_grad=True), labels)


def test_weight_decay_only_on_matrices():
    model = ToyModel(10, 8, 2, 16, 0.0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {"layers.0.ff.0.weight", "layers.0.ff.2.weight",
                       "layers.1.ff.0.weight", "layers.1.ff.2.weight", "head.weight"}
    assert "embed.weight" in {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, toy_config().optim)
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("kind", ["inverse_sqrt", "cosine", "linear", "constant"])
def test_schedules(kind):
    cfg = toy_config([f"optim.schedule={kind}", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1"]).optim
    f = lr_multiplier(cfg, max_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    if kind == "inverse_sqrt":
        assert f(15) == pytest.approx(math.sqrt(4 / 16))
    elif kind == "cosine":
        assert f(11) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
        assert f(19) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    elif kind == "linear":
        assert f(11) == pytest.approx(0.1 + 0.9 * 0.5) and f(19) == pytest.approx(0.1)
    else:
        assert f(19) == 1.0


def test_decay_follows_the_time_budget_when_it_runs_out_first():
    cfg = toy_config(["optim.schedule=linear", "optim.warmup_steps=4", "optim.decay_horizon=budget",
                      "train.max_minutes=1"]).optim
    used = [0.0]
    f = lr_multiplier(cfg, max_steps=1004, budget_used=lambda: used[0])
    assert f(1) == 0.5  # warm-up does not look at the clock
    used[0] = 0.5
    assert f(103) == pytest.approx(0.5)  # 10% of the steps, half the time: time wins
    assert f(903) == pytest.approx(0.1)  # 90% of the steps: steps win
    used[0] = 3.0
    assert f(103) == 0.0  # past the budget: the floor, never below


def test_budget_horizon_needs_a_budget():
    with pytest.raises(ConfigError, match="optim.decay_horizon"):
        toy_config(["optim.decay_horizon=budget"])


def test_budget_decay_in_a_run_reaches_the_floor_by_the_deadline(tmp_path):
    t = make_trainer(tmp_path, "optim.schedule=linear", "optim.decay_horizon=budget", "train.max_minutes=0.01",
                     "train.max_steps=1000000", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0")
    summary = t.fit()
    lrs = [r["lr"] for r in metrics(t.run_dir.path, "train")][2:]  # after the 2 warm-up steps
    assert summary["stop_reason"] == "max_minutes" and len(lrs) > 10
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # the clock only moves forward
    assert lrs[-1] < 0.25 * t.cfg.optim.lr  # a step horizon of 1e6 would still be at ~100%
    assert t.state.decay_start_s is not None


def test_scheduler_state_round_trip():
    cfg = toy_config(["optim.schedule=cosine"]).optim
    model = torch.nn.Linear(2, 2)
    a = build_optimizer(model, cfg)
    sa = build_scheduler(a, cfg, 10)
    for _ in range(3):
        a.step()
        sa.step()
    b = build_optimizer(model, cfg)
    sb = build_scheduler(b, cfg, 10)
    sb.load_state_dict(sa.state_dict())
    a.step(), sa.step(), b.step(), sb.step()
    assert sa.get_last_lr() == sb.get_last_lr() and sb.last_epoch == 4


def test_clip_gradients():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_gradients([p], 0.0).item() == pytest.approx(5.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0, 0.0]))  # 0 disables clipping
    assert clip_gradients([p], 1.0).item() == pytest.approx(5.0)  # the norm before clipping
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


# ----------------------------------------------------------------------------
# One step: exact accumulation, non-finite steps
# ----------------------------------------------------------------------------


def _pad_cat(a, b):
    width = max(a["ids"].shape[1], b["ids"].shape[1])
    pad = {"ids": 0, "mask": False, "labels": -100, "targets": -100}
    return {k: torch.cat([F.pad(a[k], (0, width - a[k].shape[1]), value=pad[k]),
                          F.pad(b[k], (0, width - b[k].shape[1]), value=pad[k])]) for k in a}


class TargetsTask(ToyTask):
    """Labels under another key: the trainer cannot count loss tokens before the forward pass."""

    def loss(self, model, batch):
        batch = {("labels" if k == "targets" else k): v for k, v in batch.items()}
        return super().loss(model, batch)


@pytest.mark.parametrize("key", ["labels", "targets"])
def test_gradient_accumulation_is_exact(tmp_path, key):
    examples = make_examples(6, seed=3)
    rename = lambda b: {(key if k == "labels" else k): v for k, v in b.items()}  # noqa: E731
    half1, half2 = rename(collate(examples[:1])), rename(collate(examples[1:]))
    assert half1["mask"].sum() * 2 < half2["mask"].sum()  # very different token counts
    over = ["model.dropout=0", "optim.clip_grad=0"]
    trainers = []
    for name, extra in (("a", ["train.grad_accum=2"]), ("b", [])):
        # seeded in __init__: same initial weights
        t = make_trainer(tmp_path, *over, *extra, name=name, task_cls=TargetsTask)
        t.setup(resume=False)
        trainers.append(t)
    accum, whole = trainers
    accum._forward_backward([half1, half2])
    whole._forward_backward([_pad_cat(half1, half2)])
    for (name, p), q in zip(accum.module.named_parameters(), whole.module.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    for t in (accum, whole):
        t.optimizer.zero_grad()
    assert accum.train_step([half1, half2]) and whole.train_step([_pad_cat(half1, half2)])
    for p, q in zip(accum.module.parameters(), whole.module.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


class NaNTask(ToyTask):
    """Returns a NaN loss on the chosen calls of `loss` (1-based), or on every call from `always_from`."""

    bad_calls: set[int] = set()
    always_from: int = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        total, n = super().loss(model, batch)
        if self.calls in self.bad_calls or (self.always_from and self.calls >= self.always_from):
            total = total * float("nan")
        return total, n


def test_non_finite_step_is_skipped(tmp_path):
    NaNTask.bad_calls, NaNTask.always_from = {1}, 0
    t = make_trainer(tmp_path, task_cls=NaNTask)
    t.setup(resume=False)
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    batch = next(iter(t.batches))
    assert t.train_step([batch]) is False
    assert all(torch.equal(before[k], v) for k, v in t.module.state_dict().items())
    assert all(p.grad is None for p in t.module.parameters())
    assert not t.optimizer.state and t.scheduler.last_epoch == 0
    assert t.train_step([batch]) is True
    assert not torch.equal(before["head.weight"], t.module.head.weight)


def test_bad_steps_are_logged_and_not_counted(tmp_path):
    NaNTask.bad_calls, NaNTask.always_from = {2, 5}, 0
    t = make_trainer(tmp_path, "train.max_steps=6", "train.eval_every=0", task_cls=NaNTask)
    summary = t.fit()
    assert summary["steps"] == 6 and summary["bad_steps"] == 2
    assert [r["step"] for r in metrics(t.run_dir.path, "bad_step")] == [1, 3]
    assert all(torch.isfinite(v).all() for v in load_file(t.run_dir.model_dir / "model.safetensors").values())


def test_divergence_stops_with_pointer_to_last_good_checkpoint(tmp_path):
    NaNTask.bad_calls, NaNTask.always_from = set(), 5
    t = make_trainer(tmp_path, "train.ckpt_every=2", "train.max_bad_steps=3", task_cls=NaNTask)
    with pytest.raises(UserError, match="diverged: 3 non-finite steps") as err:
        t.fit()
    assert "step-000004" in str(err.value)
    assert (t.run_dir.checkpoints / "step-000004" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------


def test_fit_learns_and_writes_the_run_dir(tmp_path, capsys):
    t = make_trainer(tmp_path, "train.max_steps=30", "train.eval_every=10", "train.ckpt_every=10",
                     "train.keep_last=1", "train.log_every=5")
    summary = t.fit()
    run = t.run_dir.path
    train = metrics(run, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm", "elapsed_s"):
        assert isinstance(train[0][key], float), key
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    evals = metrics(run, "eval", "valid")
    assert [r["step"] for r in evals] == [10, 20, 30]
    # best model: the evaluation with the highest accuracy
    best = max(evals, key=lambda r: r["accuracy"])
    info = json.loads((run / "checkpoints/best/best.json").read_text())
    assert info["step"] == best["step"] and info["value"] == best["accuracy"]
    # keep_last=1 keeps the newest and the best step
    kept = sorted(p.name for p in t.run_dir.checkpoints.glob("step-*"))
    assert kept == sorted({"step-000030", f"step-{best['step']:06d}"})
    # model/ loads into a fresh model and reproduces the final evaluation
    weights = load_file(run / "model/model.safetensors")
    fresh = t.task.build_model()
    assert set(weights) == set(fresh.state_dict())
    fresh.load_state_dict(weights)
    fresh.eval()
    with torch.no_grad():
        assert t.task.evaluate(fresh, "valid")["accuracy"] == pytest.approx(evals[-1]["accuracy"])
    assert json.loads((run / "model/config.json").read_text()) == t.cfg.to_dict()
    assert (run / "model/toy.json").is_file()
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["stop_reason"] == "max_steps"
    assert summary["test"]["accuracy"] > 0 and summary["valid"] == {k: evals[-1][k] for k in ("loss", "accuracy")}
    assert (run / "plots/loss.png").stat().st_size > 1000 and (run / "plots/accuracy.png").is_file()
    assert "sample: [" in capsys.readouterr().err  # task.samples printed at the end
    assert "peak_flops" in json.loads((run / "env.json").read_text())


class PlateauTask(ToyTask):
    """Accuracy improves once, then never again."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scores = iter([0.5, 0.6, 0.4, 0.55, 0.3, 0.2])

    def evaluate(self, model, split="valid"):
        return {"accuracy": next(self.scores) if split == "valid" else 0.0}


def test_early_stopping_and_best(tmp_path):
    t = make_trainer(tmp_path, "train.eval_every=1", "train.early_stopping=2", "train.max_steps=50",
                     task_cls=PlateauTask)
    summary = t.fit()
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 4
    assert summary["best"] == {"step": 2, "value": 0.6}
    assert json.loads((t.run_dir.checkpoints / "best/best.json").read_text())["step"] == 2


def peaking_task(script: list[float]):
    """A task whose valid accuracy follows `script`, one value per distinct set of weights, so
    weights loaded again score what they scored before (test: a tenth of it)."""

    class PeakTask(ToyTask):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.script, self.seen = iter(script), {}

        def evaluate(self, model, split="valid"):
            key = tuple(round(float(p.detach().double().sum()), 9) for p in model.parameters())
            if key not in self.seen:
                self.seen[key] = next(self.script)
            return {"accuracy": self.seen[key] if split == "valid" else self.seen[key] / 10}

    return PeakTask


def test_keep_best_ends_with_the_weights_best_on_valid(tmp_path):
    t = make_trainer(tmp_path, "train.eval_every=1", "train.max_steps=4", "train.keep_best=true",
                     task_cls=peaking_task([0.5, 0.9, 0.4, 0.3, 0.0]))
    summary = t.fit()
    assert summary["kept_best"] and summary["best"] == {"step": 2, "value": 0.9}
    assert summary["valid"]["accuracy"] == 0.9 and summary["test"]["accuracy"] == pytest.approx(0.09)
    best = load_file(t.run_dir.checkpoints / "best" / "model.safetensors")
    final = load_file(t.run_dir.path / "model" / "model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    # the last weights are the best: nothing to restore
    t = make_trainer(tmp_path, "train.eval_every=1", "train.max_steps=3", "train.keep_best=true",
                     task_cls=peaking_task([0.3, 0.5, 0.9]), name="rising")
    summary = t.fit()
    assert not summary["kept_best"] and summary["valid"]["accuracy"] == 0.9


def test_max_epochs_stops_at_the_end_of_an_epoch(tmp_path):
    t = make_trainer(tmp_path, "train.max_epochs=1", "train.max_steps=1000", "train.eval_every=0",
                     task_cls=lambda cfg: ToyTask(cfg, n_train=30))
    summary = t.fit()
    per_epoch = len(ToyBatches(t.task.splits["train"], t.cfg.train.seed))
    assert summary["stop_reason"] == "max_epochs" and summary["steps"] == per_epoch


class LazyEpochBatches(ToyBatches):
    """Moves to the next epoch only when the next batch is asked for (like a plain generator)."""

    def __iter__(self):
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.position < len(batches):
                self.position += 1
                yield collate([self.examples[i] for i in batches[self.position - 1]])
            self.epoch, self.position = self.epoch + 1, 0


class LazyEpochTask(ToyTask):
    def __init__(self, cfg):
        super().__init__(cfg, n_train=30)

    def train_batches(self):
        return LazyEpochBatches(self.splits["train"], self.cfg.train.seed, self.rank, self.world_size)


def test_max_epochs_with_an_iterator_that_rolls_over_lazily(tmp_path):
    t = make_trainer(tmp_path, "train.max_epochs=1", "train.max_steps=1000", "train.eval_every=0",
                     task_cls=LazyEpochTask)
    summary = t.fit()
    assert summary["steps"] == len(ToyBatches(t.task.splits["train"], t.cfg.train.seed))


def test_time_budget_stops_cleanly(tmp_path):
    t = make_trainer(tmp_path, "train.max_minutes=0.002", "train.max_steps=100000", "train.eval_every=0")
    summary = t.fit()
    assert summary["stop_reason"] == "max_minutes" and 0 < summary["steps"] < 100000
    assert (t.run_dir.checkpoints / f"step-{summary['steps']:06d}").is_dir()
    assert summary["valid"] and (t.run_dir.model_dir / "model.safetensors").is_file()


class RandomEvalTask(ToyTask):
    """An evaluation that draws random numbers (as MLM masking or sampling would)."""

    def evaluate(self, model, split="valid"):
        torch.rand(100), np.random.rand(10), random.random()
        return super().evaluate(model, split)


def test_training_does_not_depend_on_evaluation_or_measurements(tmp_path):
    final = []
    measure_matmul_flops.cache_clear()  # the first run measures the CPU's peak, the second does not
    for i, every in enumerate((1, 0)):
        t = make_trainer(tmp_path, f"train.eval_every={every}", "train.max_steps=4", name=str(i),
                         task_cls=RandomEvalTask)
        t.fit()
        final.append(load_file(t.run_dir.model_dir / "model.safetensors"))
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_bf16_autocast_and_checkpoints_by_the_minute(tmp_path):
    t = make_trainer(tmp_path, "train.precision=bf16", "train.max_steps=3", "train.ckpt_every=0",
                     "train.ckpt_every_minutes=0.00001", "train.eval_every=0", "train.progress=true")
    summary = t.fit()
    assert summary["precision"] == "bf16" and math.isfinite(summary["valid"]["loss"])
    steps = sorted(p.name for p in t.run_dir.checkpoints.glob("step-*"))
    assert steps == ["step-000001", "step-000002", "step-000003"]  # keep_last=3, one per step
    weights = load_file(t.run_dir.model_dir / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32


def scripted_accuracy(last: float, averaged: float):
    """A toy task whose final valid evaluations score `last`, then `averaged`."""
    class Scripted(ToyTask):
        scores = iter([last, averaged, 0.0])  # final valid, averaged valid, test

        def evaluate(self, model, split="valid"):
            return {**super().evaluate(model, split), "accuracy": next(self.scores)}
    return Scripted


def test_average_last_averages_checkpoint_weights(tmp_path):
    t = make_trainer(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.average_last=3",
                     "train.keep_last=1", "train.eval_every=0", task_cls=scripted_accuracy(0.5, 0.6))
    summary = t.fit()
    steps = [load_file(t.run_dir.checkpoints / f"step-{s:06d}/model.safetensors") for s in (2, 4, 6)]
    final = load_file(t.run_dir.model_dir / "model.safetensors")
    assert summary["averaged_checkpoints"] == 3
    for k in final:
        assert torch.allclose(final[k], (steps[0][k] + steps[1][k] + steps[2][k]) / 3, atol=1e-6)
    assert summary["valid"]["accuracy"] == 0.6


def test_average_last_is_dropped_when_it_scores_lower(tmp_path):
    t = make_trainer(tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.average_last=3",
                     "train.keep_last=1", "train.eval_every=0", task_cls=scripted_accuracy(0.5, 0.4))
    summary = t.fit()
    last = load_file(t.run_dir.checkpoints / "step-000006/model.safetensors")
    final = load_file(t.run_dir.model_dir / "model.safetensors")
    assert summary["averaged_checkpoints"] == 0 and summary["valid"]["accuracy"] == 0.5
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_activation_checkpointing_keeps_names_and_gradients(tmp_path, monkeypatch):
    calls = []
    real = wrapping.checkpoint
    monkeypatch.setattr(wrapping, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = collate(make_examples(4, seed=1))
    grads = []
    for i, ac in enumerate(("false", "true")):
        t = make_trainer(tmp_path, "model.dropout=0", f"train.activation_checkpointing={ac}", name=str(i))
        t.setup(resume=False)
        t._forward_backward([batch])
        grads.append({n: p.grad.clone() for n, p in t.module.named_parameters()})
    assert len(calls) == 2  # one per layer, only with checkpointing on
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_init_from_copies_matching_weights(tmp_path):
    first = make_trainer(tmp_path, "train.max_steps=2", "train.eval_every=0", name="a")
    first.fit()
    t = make_trainer(tmp_path, f"init_from={first.run_dir.path}", "train.max_steps=2", name="b")
    t.setup(resume=False)
    saved = load_file(first.run_dir.model_dir / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in t.module.state_dict().items())


@pytest.mark.slow
def test_compile_runs_with_varying_shapes(tmp_path, monkeypatch):
    # aot_eager traces forward and backward like inductor but skips C++ codegen (~60 s on 2 cores)
    seen, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or real(m, backend="aot_eager", **kw))
    t = make_trainer(tmp_path, "train.compile=true", "train.max_steps=3", "train.eval_every=0",
                     "train.log_every=1")
    summary = t.fit()
    assert summary["steps"] == 3 and seen == [{"dynamic": True}]
    assert metrics(t.run_dir.path, "compile")[0]["compile_s"] > 0
    keys = load_file(t.run_dir.checkpoints / "step-000003/model.safetensors").keys()
    assert not any("_orig_mod" in k for k in keys)


# ----------------------------------------------------------------------------
# CLI: trainformer train / plot
# ----------------------------------------------------------------------------


@pytest.fixture
def toy_recipe(tmp_path, monkeypatch):
    import trainformer.tasks

    monkeypatch.setattr(trainformer.tasks, "build_task", lambda cfg: ToyTask(cfg), raising=False)
    path = tmp_path / "toy.yaml"
    import yaml

    path.write_text(yaml.safe_dump(toy_config(["train.max_steps=4", "train.eval_every=0"]).to_dict()))
    return path


def test_cli_train_resume_and_plot(tmp_path, toy_recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", str(toy_recipe)]) == 0
    (run,) = (tmp_path / "runs").glob("toy-*")  # default RUN_DIR: runs/<recipe>-<timestamp>
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    # --resume continues from the newest checkpoint; overrides (a larger budget) still apply
    assert cli_main(["train", "--resume", str(run), "--max-steps", "6"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert [r["step"] for r in metrics(run, "train")][-1] == 6
    out = tmp_path / "cmp"
    assert cli_main(["plot", str(run), str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} >= {"train_loss.png", "metric_vs_step.png",
                                                   "metric_vs_minutes.png"}


def test_cli_user_errors_are_one_line(tmp_path, toy_recipe, capsys):
    assert cli_main(["train", "--resume", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    (tmp_path / "empty").mkdir()
    assert cli_main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert cli_main(["train", str(toy_recipe), "--out", str(tmp_path / "r")]) == 0
    assert cli_main(["train", str(toy_recipe), "--out", str(tmp_path / "r")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2


def test_progress_eta_counts_down_between_train_records(tmp_path, monkeypatch):
    from trainformer.training import progress as P

    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    bar = P.Progress(run, total_steps=None, initial_step=0, bar=True, enabled=True)
    bar.log({"event": "train", "step": 50, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 3000.0, "eta_s": 600.0})
    assert "ETA 10m00s" in bar.bar.postfix
    clock[0] += 125.0
    bar.advance()
    assert "ETA 7m55s" in bar.bar.postfix  # 600 s less the 125 s since that record
    clock[0] += 1000.0
    bar.advance()
    assert "ETA 0s" in bar.bar.postfix
    bar.close()


def test_auto_precision_decodes_small_cpu_batches_in_fp32(monkeypatch):
    """'auto' on a bf16 CPU: bf16 autocast for big decoding steps, fp32 below CPU_BF16_MIN_ROWS rows
    (autocast's casts cost more than bf16 saves there); an explicit bf16 is kept."""
    from trainformer.inference import common
    from trainformer.training import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    cpu = torch.device("cpu")
    x, w = torch.randn(2, 8), torch.randn(8, 8)

    def dtype_under(p: str, rows: int | None) -> torch.dtype:
        with common.inference_autocast(cpu, p, rows=rows):
            return (x @ w).dtype

    big, small = common.CPU_BF16_MIN_ROWS, common.CPU_BF16_MIN_ROWS - 1
    assert dtype_under("auto", big) == dtype_under("auto", None) == torch.bfloat16
    assert dtype_under("auto", small) == torch.float32
    assert dtype_under("bf16", 1) == torch.bfloat16 and dtype_under("fp32", big) == torch.float32


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """After `keep_freed_memory` (what a CPU run's setup calls), big tensors freed at the end of
    a step are reused by the next one: far fewer page faults than fresh pages would take
    (glibc's default maps every block above 32 MB afresh and faults it in again)."""
    import resource

    from trainformer.training.device import keep_freed_memory

    def faults_of_one_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits = torch.ones(16 << 20)  # 64 MB, like a step's logits
        grad, other = logits + 1, torch.ones(8 << 20)  # and its gradient, and something smaller
        del logits, grad, other
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()
    faults_of_one_step()  # the first step maps its memory
    fresh_pages = (64 + 64 + 32) * (1 << 20) // resource.getpagesize()
    assert sum(faults_of_one_step() for _ in range(4)) < 0.5 * 4 * fresh_pages

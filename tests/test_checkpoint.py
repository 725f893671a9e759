"""Checkpoints: atomic folders, safe loading, pruning, averaging, exact resume after a kill."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn

from helpers_toy import ToyModel, ToyTask, toy_config
from trainformer.errors import UserError
from trainformer.modeldir import clean_key
from trainformer.rundir import RunDir
from trainformer.training import checkpoint as ckpt
from trainformer.training.distributed import full_model_state
from trainformer.training.trainer import Trainer

HELPER = Path(__file__).parent / "helpers_toy.py"


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_weights_round_trip_with_tied_and_prefixed_names(tmp_path):
    model = Tied()
    wrapped = torch.compile(nn.Sequential(model))  # compile adds `_orig_mod.`; nothing compiles yet
    state = full_model_state(wrapped)
    assert set(state) == {"0.embed.weight", "0.head.weight"}
    assert clean_key("_orig_mod.module.layers.0.w") == "layers.0.w"
    path = tmp_path / "m.safetensors"
    ckpt.save_weights(model.state_dict(), path)
    assert set(load_file(path)) == {"embed.weight"}  # stored once
    loaded = ckpt.load_weights(path)
    assert torch.equal(loaded["head.weight"], model.embed.weight)
    fresh = Tied()
    fresh.load_state_dict(loaded)
    other = Tied()
    load_model(other, str(path))  # the standard safetensors loader reads it too
    assert torch.equal(other.head.weight, model.embed.weight)


def test_state_is_plain_data_and_loading_never_runs_code(tmp_path):
    cfg = toy_config()
    state = {"numpy": np.arange(3), "scalar": np.float32(1.5), "nested": ({"a": (1, 2)},),
             "rng": ckpt.capture_rng()}
    path = ckpt.save_checkpoint(tmp_path, 7, ToyModel(8, 4, 1, 8, 0.0).state_dict(), state, cfg)
    assert path.name == "step-000007" and (path / "config.yaml").is_file()
    loaded = ckpt.load_state(path)
    assert torch.equal(loaded["numpy"], torch.arange(3)) and loaded["scalar"] == 1.5
    assert loaded["nested"] == [{"a": [1, 2]}]
    with pytest.raises(TypeError):
        ckpt.to_plain({"bad": object()})
    # a pickle that would run code on load is refused
    evil = tmp_path / "evil"
    evil.mkdir()
    with open(evil / "state.pt", "wb") as f:
        pickle.dump({"x": Path("/tmp")}, f)
    with pytest.raises(UserError, match="unreadable training state"):
        ckpt.load_state(evil)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.randn(3), np.random.rand(), random.random()
    torch.save(ckpt.to_plain(ckpt.capture_rng()), tmp_path / "rng.pt")
    expected = (torch.randn(3), np.random.rand(), random.random(), np.random.randn())
    torch.randn(5), np.random.rand(4), random.random()
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.randn(3), np.random.rand(), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / ckpt.step_dir_name(step)
    path.mkdir(parents=True)
    (path / ckpt.WEIGHTS).write_bytes(b"x")
    if complete:
        (path / ckpt.STATE).write_bytes(b"x")
    return path


def test_tmp_and_incomplete_folders_are_ignored_and_pruning_keeps_newest_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 6, complete=False)
    (tmp_path / "step-000009.tmp").mkdir()  # a write cut short by a kill
    (tmp_path / "step-000009.tmp" / ckpt.STATE).write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, protect=[tmp_path / "step-000001"])
    assert sorted(p.name for p in removed) == ["step-000002", "step-000003"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step-000001", "step-000004", "step-000005", "step-000006"]


def test_average_checkpoints(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"c{i}"
        path.mkdir()
        ckpt.save_weights({"w": torch.full((2,), float(i)), "n": torch.tensor([i])}, path / ckpt.WEIGHTS)
        paths.append(path)
    avg = ckpt.average_checkpoints(paths)
    assert torch.equal(avg["w"], torch.full((2,), 1.0)) and avg["n"].item() == 2


# ----------------------------------------------------------------------------
# Exact resume and signals (subprocesses running tests/helpers_toy.py)
# ----------------------------------------------------------------------------

DETERMINISTIC = ["train.deterministic=true", "train.threads=1", "train.max_steps=8",
                 "train.ckpt_every=2", "train.eval_every=3", "train.log_every=1", "model.dropout=0.1"]


def run_toy(run_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    sets = [a for s in DETERMINISTIC for a in ("--set", s)]
    proc = subprocess.run([sys.executable, str(HELPER), str(run_dir), *sets, *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cfg = toy_config(DETERMINISTIC)  # the uninterrupted run, in this process
    Trainer(cfg, ToyTask(cfg), RunDir(straight)).fit()
    torch.set_num_threads(threads), torch.use_deterministic_algorithms(det)
    proc = run_toy(killed, "--kill-after-checkpoint", "4", check=False)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == "step-000004"
    # a checkpoint write cut short by a kill is left as .tmp and must be ignored
    tmp = killed / "checkpoints" / "step-000006.tmp"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"garbage")
    run_toy(killed, "--resume")
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = ckpt.load_state(straight / "checkpoints" / "step-000008")
    sb = ckpt.load_state(killed / "checkpoints" / "step-000008")
    for name, st in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][name][k]) for k, v in st.items())
    assert sa["ranks"][0]["batches"] == sb["ranks"][0]["batches"]
    losses = [[r["loss"] for r in RunDir(d).read_metrics() if r.get("event") == "train"]
              for d in (straight, killed)]
    assert losses[1][-4:] == losses[0][-4:]  # steps 5..8 after the resume
    assert not tmp.exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    sets = [a for s in ("train.max_steps=100000", "train.log_every=1", "train.eval_every=0",
                        "train.ckpt_every=0", "train.threads=1") for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, str(HELPER), str(run), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(
        r.get("event") == "train" and r["step"] >= 3 for r in RunDir(run).read_metrics()
    ):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "signal" and 3 <= summary["steps"] < 100000
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    assert ckpt.checkpoint_step(latest) == summary["steps"]
    assert ckpt.load_state(latest)["train"]["step"] == summary["steps"]

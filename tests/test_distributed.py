"""Two gloo processes on CPU (torchrun): DDP equals one process with the same global batch,
FSDP2 equals DDP, and a distributed (FSDP) checkpoint resumes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_toy import ToyTask, toy_config
from trainformer.rundir import RunDir
from trainformer.training.distributed import DistEnv, env_from_torchrun, resolve_backend
from trainformer.training.trainer import Trainer

HELPER = Path(__file__).parent / "helpers_toy.py"
COMMON = ["model.dropout=0", "train.threads=1", "train.log_every=1", "train.eval_every=3",
          "train.ckpt_every=3", "optim.schedule=inverse_sqrt"]  # a schedule that ignores max_steps


def test_single_process_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert env_from_torchrun() == DistEnv(0, 1, 0)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert env_from_torchrun().rank == 1 and not env_from_torchrun().is_main
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in RunDir(run).read_metrics() if r.get("event") == "train"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_and_fsdp_match_one_process(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cfg = toy_config([*COMMON, "train.grad_accum=2", "train.max_steps=6"])
    Trainer(cfg, ToyTask(cfg), RunDir(tmp_path / "single")).fit()
    torch.set_num_threads(threads), torch.use_deterministic_algorithms(det)

    torchrun = Path(sys.executable).with_name("torchrun")
    sets = [a for s in COMMON for a in ("--set", s)]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(HELPER),
                           str(tmp_path), "--distributed-suite", *sets],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single, ddp, fsdp = losses(tmp_path / "single"), losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(single) == len(ddp) == len(fsdp) == 6  # fsdp: 3 steps + 3 after the resume
    assert single[-1] < single[0]
    assert ddp == pytest.approx(single, rel=1e-5)
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors")
               for name in ("single", "ddp", "fsdp")}
    assert weights["ddp"].keys() == weights["single"].keys() == weights["fsdp"].keys()
    for k, v in weights["single"].items():
        assert torch.allclose(weights["ddp"][k], v, atol=1e-5), k
        assert torch.allclose(weights["fsdp"][k], v, atol=1e-5), k
    # the FSDP checkpoints hold the full model, written once by rank 0
    step3 = load_file(tmp_path / "fsdp" / "checkpoints" / "step-000003" / "model.safetensors")
    assert {k: v.shape for k, v in step3.items()} == {k: v.shape for k, v in weights["single"].items()}
    assert "resumed from" in proc.stdout + proc.stderr

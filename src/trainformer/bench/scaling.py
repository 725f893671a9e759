"""How decoder training speed and memory scale: sequence length (with and without activation
checkpointing), batch size, and 2-process DDP (gloo, torchrun) against 1 process. Record only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from trainformer.bench.memory import PeakMemory, run_isolated
from trainformer.bench.models import Shape, _batch, make_step, ours
from trainformer.bench.timing import summarize
from trainformer.training.wrapping import apply_activation_checkpointing


def decoder_point(shape: dict, device: str, precision: str, checkpointing: bool, compile: bool,
                  steps: int, warmup: int, rss=None) -> dict:
    """Tokens/s (median step) and peak memory of our decoder's training step at one shape.

    Module-level so `run_isolated` can run it in a fresh process (CPU memory).
    """
    dev, s = torch.device(device), Shape(**shape)
    torch.manual_seed(0)
    model = ours("decoder", s).to(dev).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        model = torch.compile(model)
    x, y = _batch(s, dev)
    step = make_step("decoder", True, model, x, y, dev, precision)
    with PeakMemory(dev, rss) as mem:
        times = [step() for _ in range(warmup + steps)][warmup:]
    stats = summarize(times)
    return {"seq": s.seq, "batch": s.batch, "checkpointing": checkpointing, **stats,
            "tokens_per_s": s.batch * s.seq / stats["median_s"], "peak_mem_mb": mem.mb}


def seq_scaling(s: Shape, seqs: list[int], device: torch.device, precision: str, compile: bool,
                steps: int, warmup: int) -> list[dict]:
    """`decoder_point` for each sequence length, without and with activation checkpointing."""
    out = []
    for seq in seqs:
        for ckpt in (False, True):
            shape = asdict(Shape(**{**asdict(s), "seq": seq}))
            kwargs = dict(shape=shape, device=str(device), precision=precision, checkpointing=ckpt,
                          compile=compile, steps=steps, warmup=warmup)
            out.append(run_isolated(decoder_point, kwargs, device))
    return out


def batch_scaling(s: Shape, batches: list[int], device: torch.device, precision: str, compile: bool,
                  steps: int, warmup: int) -> list[dict]:
    """`decoder_point` for each batch size at the shape's sequence length (no checkpointing)."""
    out = []
    for b in batches:
        shape = asdict(Shape(**{**asdict(s), "batch": b}))
        kwargs = dict(shape=shape, device=str(device), precision=precision, checkpointing=False,
                      compile=compile, steps=steps, warmup=warmup)
        out.append(run_isolated(decoder_point, kwargs, device))
    return out


def _torchrun(nproc: int, args: list[str], threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainformer.bench.ddp_worker", "--out", str(out), *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"torchrun --nproc_per_node={nproc} failed: {' | '.join(tail)}")
        return json.loads(out.read_text())


def ddp_scaling(s: Shape, steps: int, warmup: int, timeout: float = 600) -> dict:
    """Global tokens/s of CPU DDP training (gloo) with 2 processes against 1, same per-process batch.

    Each process gets cores // processes threads, so both runs use the same cores.
    """
    cores = max(1, torch.get_num_threads())
    args = ["--shape", json.dumps(asdict(s)), "--steps", str(steps), "--warmup", str(warmup)]
    one = _torchrun(1, args, cores, timeout)
    two = _torchrun(2, args, max(1, cores // 2), timeout)
    return {"cores": cores, "shape": asdict(s), "1proc": one, "2proc": two,
            "scaling": two["tokens_per_s"] / one["tokens_per_s"]}

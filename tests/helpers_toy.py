"""A toy Task for the trainer's tests, and a script that trains it.

The toy job: for every token t of a random sequence predict (3 t + 1) mod V
plus a bit of context (the masked mean of the sequence), so padding must be
masked for the loss to be right. Batches are padded, of varying sizes, come
from an endless iterator with (epoch, position) state, and are sharded by
rank. `evaluate` returns loss and accuracy.

As a script (used by the kill/resume and torchrun tests):

    python tests/helpers_toy.py RUN_DIR [--resume] [--set KEY=VALUE ...]
        [--kill-after-checkpoint STEP]
    torchrun --nproc_per_node 2 tests/helpers_toy.py BASE_DIR --distributed-suite
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import Config, apply_overrides, from_dict
from trainformer.rundir import RunDir
from trainformer.training.loss import IGNORE_INDEX, cross_entropy_sum
from trainformer.training.task import Batch, Task

VOCAB = 24
PAD = 0


def toy_config(overrides: list[str] | None = None) -> Config:
    """A tiny, fast config for the toy task (CPU fp32, 2 layers of width 32)."""
    data = {
        "task": "lm",
        "name": "toy",
        "model": {"family": "decoder", "vocab_size": VOCAB, "d_model": 32, "n_heads": 2,
                  "n_layers": 2, "d_ff": 64, "dropout": 0.1},
        "data": {"max_tokens": 64, "valid_size": 32, "test_size": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "inverse_sqrt", "clip_grad": 1.0},
        # one thread: tiny matmuls gain nothing from two, and lose a lot on a busy machine
        "train": {"max_steps": 12, "precision": "fp32", "device": "cpu", "threads": 1, "log_every": 2,
                  "eval_every": 6, "ckpt_every": 6, "label_smoothing": 0.0, "progress": False},
    }
    return from_dict(apply_overrides(data, list(overrides or [])))


class ToyModel(nn.Module):
    """Embedding -> residual MLP layers (+ masked-mean context) -> vocabulary logits.

    forward(ids (B, T), mask (B, T)) -> logits (B, T, V).
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, d_ff: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(ToyLayer(d_model, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, mask)
        return self.head(self.norm(h))  # (B, T, V)


class ToyLayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(2 * d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        context = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)  # (B, 1, D)
        x = torch.cat([x, context.expand_as(x)], dim=-1)  # (B, T, 2D)
        return h + self.dropout(self.ff(x))


def make_examples(n: int, seed: int) -> list[np.ndarray]:
    """`n` random sequences of 3..12 tokens in [1, VOCAB)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(3, 13))) for _ in range(n)]


def collate(examples: list[np.ndarray]) -> Batch:
    """Pad to the longest; labels -100 on padding. ids/labels/mask: (B, T)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.from_numpy(e)
    mask = ids != PAD
    labels = torch.where(mask, (3 * ids + 1) % VOCAB, torch.full_like(ids, IGNORE_INDEX))
    return {"ids": ids, "mask": mask, "labels": labels}


class ToyBatches:
    """Endless batches with (epoch, position) state; rank r of W takes batches r, r+W, ...

    Each epoch shuffles the examples with seed + epoch and cuts them into
    batches of 2..6 examples, so sizes and padding vary.
    """

    def __init__(self, examples: list[np.ndarray], seed: int, rank: int = 0, world_size: int = 1):
        self.examples = examples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # index of the next batch of this rank within the epoch
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(len(self.examples))
            cuts, start = [], 0
            while start < len(order):
                size = int(rng.integers(2, 7))
                cuts.append(order[start: start + size].tolist())
                start += size
            usable = len(cuts) - len(cuts) % self.world_size  # every rank gets as many
            self._cache = (epoch, cuts[:usable][self.rank:: self.world_size])
        return self._cache[1]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batches = self._epoch_batches(self.epoch)
            index = self.position
            # advance first, so state_dict() names the batch that comes next
            self.position += 1
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
            yield collate([self.examples[i] for i in batches[index]])

    def __len__(self) -> int:
        return len(self._epoch_batches(self.epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ToyTask(Task):
    main_metric = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: Config, n_train: int = 96):
        super().__init__(cfg)
        self.n_train = n_train
        self.rank, self.world_size = 0, 1

    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        seed = self.cfg.data.split_seed
        self.splits = {
            "train": make_examples(self.n_train, seed),
            "valid": make_examples(int(self.cfg.data.valid_size), seed + 1),
            "test": make_examples(int(self.cfg.data.test_size), seed + 2),
        }

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return ToyModel(m.vocab_size, m.d_model, m.n_layers, m.d_ff, m.dropout)

    def train_batches(self) -> ToyBatches:
        return ToyBatches(self.splits["train"], self.cfg.train.seed, self.rank, self.world_size)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["ids"], batch["mask"])
        return cross_entropy_sum(logits, batch["labels"], self.cfg.train.label_smoothing)

    def has_split(self, split: str) -> bool:
        return len(self.splits.get(split, [])) > 0

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        device = next(model.parameters()).device
        examples = self.splits[split]
        loss, n, correct = 0.0, 0, 0
        for start in range(0, len(examples), 8):
            batch = {k: v.to(device) for k, v in collate(examples[start: start + 8]).items()}
            logits = model(batch["ids"], batch["mask"])
            s, k = cross_entropy_sum(logits, batch["labels"])
            loss, n = loss + float(s), n + int(k)
            real = batch["labels"] != IGNORE_INDEX
            correct += int(((logits.argmax(-1) == batch["labels"]) & real).sum())
        return {"loss": loss / n, "accuracy": correct / n}

    def save_artifacts(self, model_dir: Path) -> None:
        (model_dir / "toy.json").write_text(json.dumps({"vocab": VOCAB}), encoding="utf-8")

    def samples(self, model: nn.Module) -> list[str]:
        device = next(model.parameters()).device
        batch = collate(self.splits["valid"][:2])
        pred = model(batch["ids"].to(device), batch["mask"].to(device)).argmax(-1).cpu()
        return [f"sample: {ids[m].tolist()} -> {p[m].tolist()}"
                for ids, m, p in zip(batch["ids"], batch["mask"], pred)]


# ----------------------------------------------------------------------------
# Script entry: train the toy task in a run dir (used by subprocess tests)
# ----------------------------------------------------------------------------


def distributed_suite(base: Path, overrides: list[str]) -> None:
    """Under torchrun: DDP for 6 steps, then FSDP for 3 steps + resume to 6 (one launch, three runs)."""
    from trainformer.training.trainer import Trainer

    runs = [("ddp", ["parallel.strategy=ddp", "train.max_steps=6"], False),
            ("fsdp", ["parallel.strategy=fsdp", "train.max_steps=3"], False),
            ("fsdp", ["parallel.strategy=fsdp", "train.max_steps=6"], True)]
    for name, extra, resume in runs:
        cfg = toy_config([*overrides, *extra])
        Trainer(cfg, ToyTask(cfg), RunDir(base / name)).fit(resume=resume)


def main(argv: list[str] | None = None) -> int:
    from trainformer.training import distributed
    from trainformer.training.trainer import Trainer

    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--kill-after-checkpoint", type=int, default=0,
                   help="SIGKILL this process right after writing the checkpoint of this step")
    p.add_argument("--distributed-suite", action="store_true", help="see distributed_suite()")
    args = p.parse_args(argv)
    if args.distributed_suite:
        try:
            distributed_suite(args.run_dir, args.overrides)
        finally:
            distributed.shutdown()
        return 0
    cfg = toy_config(args.overrides)

    class KillingTrainer(Trainer):
        def save_checkpoint(self):
            path = super().save_checkpoint()
            if args.kill_after_checkpoint and self.state.step == args.kill_after_checkpoint:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

    trainer = KillingTrainer(cfg, ToyTask(cfg), RunDir(args.run_dir))
    try:
        summary = trainer.fit(resume=args.resume)
    finally:
        distributed.shutdown()
    if trainer.env.is_main:
        print("SUMMARY " + json.dumps({"steps": summary["steps"], "stop_reason": summary["stop_reason"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a task supplies to the one training loop.

Translation, extraction and chat differ in data, model and loss — not in the
loop. A task owns its data (tokenizer, splits, batches), builds its model,
computes a summed loss with its token count (so gradient accumulation can
normalise by the tokens of all micro-batches), and evaluates its metric.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainformer.config import Config
from trainformer.training.loss import cross_entropy_sum


def spread_indices(n: int, limit: int) -> list[int]:
    """`limit` indices evenly spaced over range(n) (all of them when limit is 0 or >= n).

    A capped evaluation set must not be its first rows: data files are often
    ordered (Tatoeba by length), and the first 500 sentences are the easy ones.
    """
    if not limit or limit >= n:
        return list(range(n))
    if limit == 1:
        return [0]
    return [i * (n - 1) // (limit - 1) for i in range(limit)]

Batch = dict[str, torch.Tensor]


class StatefulBatches(Protocol):
    """An endless (epoch after epoch) iterator of batches that can be checkpointed.

    `state_dict()` is small (epoch, position, seed); `load_state_dict()` makes
    the next batch exactly the one that would have come next — no replaying.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(ABC):
    """Base class for tasks. Subclasses set `main_metric` and `higher_is_better`."""

    main_metric: str = "loss"
    higher_is_better: bool = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.tokenizer: Any = None  # a trainformer.data.tokenizer.TextTokenizer after setup()
        self.report: dict[str, Any] = {}  # what data was used and dropped; see write_data_report

    def write_data_report(self, run_dir: Path | None, rank: int) -> None:
        """RUN_DIR/data.json: `self.report` (data files, malformed lines, split sizes); rank 0 only."""
        if run_dir is None or rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.report, indent=2, ensure_ascii=False, default=str) + "\n"
        (run_dir / "data.json").write_text(text, encoding="utf-8")

    @abstractmethod
    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        """Read data, train or load the tokenizer, make splits; set model sizes in cfg.model."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The task's model, randomly initialised (the trainer loads `init_from`)."""

    @abstractmethod
    def train_batches(self) -> StatefulBatches:
        """Training batches for this rank (CPU tensors; the trainer moves them)."""

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (..., C), labels (...)) of one micro-batch: what the loss compares.

        Labels are class ids, -100 where no loss is taken. Call the model as
        ``model(...)``: DDP and torch.compile wrap only `forward`. Distillation
        (`compression.distill`) compares a student's scores with a teacher's here.
        """
        raise NotImplementedError(f"{type(self).__name__} computes its loss without logits()")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-token losses, number of tokens that carry loss) for one micro-batch:
        the label-smoothed cross-entropy of `logits`."""
        return cross_entropy_sum(*self.logits(model, batch), self.cfg.train.label_smoothing)

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        """Metrics on a split; must include `main_metric`.

        Runs on rank 0 (on every rank under FSDP) in eval mode, under no_grad and
        autocast, with the RNG state saved and restored around it.
        """

    def loss_tokens(self, batch: Batch) -> int | None:
        """Tokens that will carry loss, counted before the forward pass so gradient
        accumulation divides by the exact total. None: the trainer rescales afterwards."""
        labels = batch.get("labels")
        return int((labels != -100).sum()) if labels is not None else None

    def has_split(self, split: str) -> bool:
        """Whether `evaluate(model, split)` has data (the trainer skips missing splits)."""
        return split in ("valid", "test")

    def batch_tokens(self, batch: Batch) -> int:
        """Non-padding tokens processed by a batch (for tokens/s). Default: every mask True."""
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("mask")))

    def save_artifacts(self, model_dir: Path) -> None:
        """Write what inference needs beside the weights: here tokenizer.json, when the task has a
        tokenizer; a task adds its own files (labels.json, transitions.json) after calling this."""
        if self.tokenizer is not None:
            self.tokenizer.save(model_dir / "tokenizer.json")

    def samples(self, model: nn.Module) -> list[str]:
        """A few human-readable outputs printed at the end of a run."""
        return []

    #: Share of tokens whose hidden state goes through the vocabulary projection.
    vocab_scored_share: float = 1.0

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token for MFU: 6 x the weights a token is multiplied by
        (Kaplan et al. 2020). Embedding tables are looked up, not multiplied, so they
        count only as a tied output projection, for `vocab_scored_share` of the tokens.
        """
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
        tok = getattr(model, "tok_embed", None)
        tied = tok.weight.numel() if tok is not None and self.cfg.model.tie_embeddings else 0
        return 6.0 * (dense + self.vocab_scored_share * tied)

    def data_report(self) -> dict[str, Any]:
        """Counts of skipped/malformed lines, split sizes, padding — logged to metrics: `self.report`,
        which `setup` fills (and `write_data_report` saves)."""
        return self.report

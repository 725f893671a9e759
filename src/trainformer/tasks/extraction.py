"""What the fine-tuned extraction tasks (NER, relations) share.

(BIO tags and their decoding: `trainformer.inference.bio`; entity markers:
`trainformer.data.markers`.)

- Splits: official ones where a data set has them, the rest carved from train
  (`dataset_splits`).
- `inherit_pretrained`: a fine-tuning run takes the tokenizer and the network
  shape of the model it starts from (`Config.init_from`).
- `FineTuneTask`: what the NER and relation tasks share (data set-up, batches,
  model, artifacts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from trainformer.config import Config, DataConfig
from trainformer.data.batching import StoreBatches, TokenBudgetSampler
from trainformer.data.cache import TokenStore
from trainformer.data.readers import ReadResult, filter_too_long
from trainformer.data.registry import read_dataset
from trainformer.data.splits import make_splits
from trainformer.errors import DataError
from trainformer.modeldir import pretrained, take_pretrained_shape
from trainformer.models import build_model
from trainformer.textio import warn
from trainformer.training.task import Batch, StatefulBatches, Task, spread_indices

# ----------------------------------------------------------------------------
# Splits: official ones where the data set has them, carved from train otherwise
# ----------------------------------------------------------------------------


@dataclass
class SplitData:
    """The examples of one split: rows `index` of a reader's result."""

    result: ReadResult[Any]
    index: np.ndarray  # (K,) int64 rows of result.examples

    @property
    def examples(self) -> list[Any]:
        return [self.result.examples[i] for i in self.index]

    def __len__(self) -> int:
        return len(self.index)


def dataset_splits(
    cfg: DataConfig,
    key: Callable[[Any], str],
    row: Callable[[Any], Hashable],
    group_rule: str,
    default_format: str,
) -> tuple[dict[str, SplitData], dict[str, Any]]:
    """train/valid/test of `cfg.dataset`: its official files, missing splits carved from train.

    SemEval-2010 ships train and test only, a plain file only train: the
    missing splits are taken from train by `make_splits` — whole groups by
    `key` (e.g. the sentence without markers, lowercased), deterministic in
    `cfg.split_seed`, exact duplicate `row`s removed. Official splits are
    kept as they are. `cfg.limit` then cuts train. A file given by path is
    read as `default_format` unless ``data.format`` says otherwise.

    Returns:
        ({"train", "valid", "test"} -> SplitData, a report for data.json).
    """
    results = read_dataset(cfg if cfg.format else replace(cfg, format=default_format))
    train = results["train"]
    out = {name: SplitData(r, np.arange(len(r.examples))) for name, r in results.items()}
    missing = [s for s in ("valid", "test") if s not in results]
    report: dict[str, Any] = {"files": {s: str(r.path) for s, r in results.items()}}
    if missing:
        sizes = {"valid": cfg.valid_size, "test": cfg.test_size}
        splits = make_splits(
            rows=[row(e) for e in train.examples],
            keys=[key(e) for e in train.examples],
            valid_size=sizes["valid"] if "valid" in missing else 0,
            test_size=sizes["test"] if "test" in missing else 0,
            seed=cfg.split_seed,
            group_rule=group_rule,
        )
        out["train"] = SplitData(train, splits.train)
        for name in missing:
            out[name] = SplitData(train, splits[name])
        report["carved_from_train"] = {"splits": missing, **splits.report()}
    if cfg.limit:
        out["train"].index = out["train"].index[: cfg.limit]
    report["sizes"] = {name: len(s) for name, s in out.items()}
    report["bad_lines"] = {name: r.bad.report() for name, r in results.items()}
    return out, report


# ----------------------------------------------------------------------------
# Fine-tuning from a pretrained encoder
# ----------------------------------------------------------------------------

# What a fine-tuned model takes from the model it starts from: everything that
# shapes the weights. The head, its label count, its CRF, its character CNN and dropout
# are the task's own (the pretrained encoder never has a character CNN: it starts fresh).
_OWN_KEYS = {"head", "num_labels", "dropout", "preset", "crf", "char_cnn"}


def inherit_pretrained(cfg: Config) -> Path | None:
    """Point a fine-tuning config at its pretrained model's tokenizer and shape.

    When `cfg.init_from` is set: ``data.tokenizer.path`` becomes its
    tokenizer.json (the embedding rows only mean something with that
    tokenizer), and every `ModelConfig` key that shapes the weights is copied
    from its config.json — a recipe that disagrees would otherwise load only
    the tensors whose shapes happen to match. Differences are printed.
    Returns the pretrained model/ folder, or None without `init_from`.
    """
    if not cfg.init_from:
        return None
    src, pre = pretrained(cfg.init_from, "encoder",
                          "train one first, e.g. trainformer train encoder-mlm --out runs/encoder-mlm")
    changed = take_pretrained_shape(cfg.model, pre.model, _OWN_KEYS)
    if changed:
        warn(f"init_from {src}: taking the pretrained shape ({', '.join(changed)})")
    cfg.data.tokenizer.path = str(src / "tokenizer.json")
    return src


# ----------------------------------------------------------------------------
# Files beside a run and a model
# ----------------------------------------------------------------------------


def save_labels(model_dir: Path, labels: Sequence[str]) -> None:
    """model/labels.json: the label names in id order."""
    (model_dir / "labels.json").write_text(json.dumps(list(labels), indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------
# What the fine-tuning tasks (NER, relations) share
# ----------------------------------------------------------------------------


class FineTuneTask(Task):
    """An encoder task with labels, fine-tuned from a pretrained encoder when `init_from` is set.

    Subclasses read their data with `read_splits`, fill `tokenizer`, `labels`
    and `eval_sets`, build a `TokenStore` of train rows (field ``ids`` without
    ``<cls>``/``<sep>``) and call `finish_setup`; they supply `collate`,
    `loss` and `evaluate`.
    """

    higher_is_better = True
    head = ""  # the encoder head (`ModelConfig.head`)
    vocab_scored_share = 0.0  # a label head, no vocabulary projection

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.labels: list[str] = []
        self.eval_sets: dict[str, list[Any]] = {}

    def read_splits(
        self, key: Callable[[Any], str], row: Callable[[Any], Hashable], group_rule: str, default_format: str
    ) -> tuple[dict[str, SplitData], dict[str, Any]]:
        """Take over `init_from`'s tokenizer and shape, then read the splits (see `dataset_splits`)."""
        pretrained = inherit_pretrained(self.cfg)
        splits, report = dataset_splits(self.cfg.data, key, row, group_rule, default_format)
        train = splits["train"]
        if not len(train):
            raise DataError(f"{train.result.path}: no usable examples for training")
        return splits, {"dataset": self.cfg.data.dataset, "pretrained": str(pretrained) if pretrained else None,
                        **report}

    def finish_setup(self, run_dir: Path | None, rank: int, world_size: int, train: SplitData,
                     store: TokenStore, report: dict[str, Any]) -> None:
        """Keep the train rows that fit (counted as too long otherwise), set the model's sizes, write data.json."""
        assert self.tokenizer is not None
        lengths = store.lengths("ids") + 2  # + <cls> and <sep>
        limit = min(self.cfg.data.max_len, self.cfg.model.max_len)
        self.store = store
        self.train_index = filter_too_long(train.result, lengths, limit, rows=train.index)
        self.lengths = lengths[self.train_index]
        self.rank, self.world_size = rank, world_size
        m = self.cfg.model
        m.vocab_size, m.num_labels, m.head = self.tokenizer.vocab_size, len(self.labels), self.head
        self.report = {**report, "labels": self.labels, "train_examples": int(len(self.train_index)),
                       "train_dropped_too_long": int(len(train) - len(self.train_index)), **self.pack_train()}
        self.write_data_report(run_dir, rank)

    def pack_train(self) -> dict[str, Any]:
        """Regroup the kept training rows (`store`, `train_index`, `lengths`) before batching;
        returns what to add to the data report. Default: nothing to do."""
        return {}

    def collate(self, rows: dict[str, list[np.ndarray]]) -> Batch:
        """A training batch from ``store.take(rows)``."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return bool(self.eval_sets.get(split))

    def train_batches(self) -> StatefulBatches:
        c = self.cfg
        sampler = TokenBudgetSampler(self.lengths, c.data.max_tokens, c.train.seed, True, self.rank, self.world_size)
        return StoreBatches(sampler, self.store, self.collate, self.train_index)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model)

    def eval_examples(self, split: str) -> list[Any]:
        """The examples of `split`; valid is capped by ``eval.max_examples`` (periodic evaluation)."""
        data = self.eval_sets[split]
        limit = self.cfg.eval.max_examples if split == "valid" else 0
        return [data[i] for i in spread_indices(len(data), limit)]

    def sample_examples(self) -> list[Any]:
        """``eval.samples`` examples spread over test (or valid), for `samples`."""
        data = self.eval_sets.get("test") or self.eval_sets.get("valid") or []
        n = self.cfg.eval.samples
        return [data[i] for i in spread_indices(len(data), n)] if n else []

    def save_artifacts(self, model_dir: Path) -> None:
        super().save_artifacts(model_dir)
        save_labels(model_dir, self.labels)

"""Helpers shared by the information-extraction tasks (NER, relations, MLM pretraining).

- BIO tags: normalising IOB1/BIOES input to BIO (IOB2), the label set, and a
  constrained Viterbi decoder that never emits an invalid sequence.
- Words with character offsets into the original text (`split_words`), so
  extracted entities point back at the exact characters of the input line.
- Splits: official ones where a data set has them, the rest carved from train
  (`dataset_splits`).
- `inherit_pretrained`: a fine-tuning run takes the tokenizer and the network
  shape of the model it starts from (`Config.init_from`).
- `FineTuneTask`: what the NER and relation tasks share (data set-up, batches,
  model, artifacts); `read_eval_file` for their `trainformer evaluate`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import Config, DataConfig
from trainformer.data.batching import StoreBatches, TokenBudgetSampler
from trainformer.data.cache import TokenStore
from trainformer.data.readers import ReadResult, filter_too_long
from trainformer.data.registry import read_dataset
from trainformer.data.splits import make_splits
from trainformer.errors import DataError, UserError
from trainformer.modeldir import pretrained, take_pretrained_shape
from trainformer.models import build_model
from trainformer.textio import warn
from trainformer.training.task import Batch, StatefulBatches, Task, spread_indices

OUTSIDE = "O"

# ----------------------------------------------------------------------------
# BIO tags
# ----------------------------------------------------------------------------


def tag_type(tag: str) -> str | None:
    """``"B-PER"`` -> ``"PER"``; ``"O"`` -> None."""
    return None if tag == OUTSIDE else tag[2:]


def to_bio(tags: Sequence[str]) -> list[str]:
    """Any of IOB1, IOB2 (BIO) or BIOES -> BIO.

    ``S-X`` becomes ``B-X``, ``E-X`` becomes ``I-X``, and an ``I-X`` that does
    not continue an entity of type X (IOB1 style, or a broken sequence)
    becomes ``B-X``. A BIO sequence comes back unchanged.
    """
    out: list[str] = []
    prev = OUTSIDE
    for tag in tags:
        kind, typ = (tag[0], tag[2:]) if tag != OUTSIDE else ("O", None)
        if kind == "S":
            kind = "B"
        elif kind == "E":
            kind = "I"
        if kind == "I" and tag_type(prev) != typ:
            kind = "B"
        new = OUTSIDE if kind == "O" else f"{kind}-{typ}"
        out.append(new)
        prev = new
    return out


def bio_labels(types: Sequence[str]) -> list[str]:
    """The label list: ``O`` first, then ``B-X``, ``I-X`` for each type in sorted order."""
    return [OUTSIDE] + [f"{p}-{t}" for t in sorted(set(types)) for p in "BI"]


def allowed_transitions(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which BIO labels may start a sentence and follow one another.

    Returns:
        start (L,) bool: anything but ``I-X``.
        trans (L, L) bool: trans[i, j] is True when label j may follow label i;
        ``I-X`` may follow only ``B-X`` or ``I-X``.
    """
    types = [tag_type(t) for t in labels]
    inside = [t.startswith("I-") for t in labels]
    start = torch.tensor([not i for i in inside])
    trans = torch.ones(len(labels), len(labels), dtype=torch.bool)
    for j, (is_inside, typ) in enumerate(zip(inside, types)):
        if is_inside:
            trans[:, j] = torch.tensor([types[i] == typ for i in range(len(labels))])
    return start, trans


@dataclass
class TransitionPrior:
    """Tag-bigram log-probabilities counted on training sentences, for Viterbi decoding.

    A tagger that scores each word on its own often splits one name in two
    (``Mark/B-PER Butcher/B-PER``): nothing in a per-word softmax says that a
    ``B-PER`` is rarely followed by another. Adding ``weight`` x log P(tag |
    previous tag) to the path score (and log P(first tag) at the start) puts
    that knowledge into decoding. The counts are add-one smoothed.

    Attributes:
        start: (L,) log P(first tag); trans: (L, L) log P(next tag | tag), row = previous.
        weight: how much the decoder trusts the prior; 0 = only the BIO validity rules.
    """

    start: torch.Tensor
    trans: torch.Tensor
    weight: float = 1.0

    @classmethod
    def count(cls, sequences: Sequence[Sequence[int]], n_labels: int, weight: float = 1.0) -> TransitionPrior:
        """The prior of label-id sequences (the training sentences' tags)."""
        firsts = [seq[0] for seq in sequences if len(seq)]
        pairs = [a * n_labels + b for seq in sequences for a, b in zip(seq[:-1], seq[1:])]
        start = 1.0 + np.bincount(firsts, minlength=n_labels)  # add-one
        trans = 1.0 + np.bincount(pairs, minlength=n_labels * n_labels).reshape(n_labels, n_labels)
        start, trans = torch.from_numpy(start).float(), torch.from_numpy(trans).float()
        return cls((start / start.sum()).log(), (trans / trans.sum(1, keepdim=True)).log(), weight)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        return {"labels": list(labels), "weight": self.weight, "start": self.start.tolist(),
                "transitions": self.trans.tolist(), "counted_on": "training sentences (add-one)"}

    @classmethod
    def from_json(cls, data: dict[str, Any], labels: Sequence[str], source: Path) -> TransitionPrior:
        if data.get("labels") != list(labels):
            raise UserError(f"{source}: its labels differ from labels.json")
        start, trans, n = torch.tensor(data["start"]), torch.tensor(data["transitions"]), len(labels)
        if start.shape != (n,) or trans.shape != (n, n):
            raise ValueError(f"expected {n} start and {n}x{n} transition scores, got shapes "
                             f"{tuple(start.shape)} and {tuple(trans.shape)}")
        return cls(start, trans, float(data["weight"]))

    def with_weight(self, weight: float) -> TransitionPrior:
        return replace(self, weight=weight)


def viterbi_bio(
    scores: torch.Tensor, lengths: torch.Tensor, labels: Sequence[str], prior: TransitionPrior | None = None
) -> list[list[int]]:
    """The best valid BIO label sequence of each sentence (constrained Viterbi).

    The score of a sequence is the sum of its per-word scores (log-probabilities
    of the first subword of each word), plus the weighted `prior` of its tag
    bigrams if given; forbidden starts and transitions (``I-X`` not after
    ``B-X``/``I-X``) score -inf, so the result is always a valid BIO sequence.
    We decode instead of repairing the argmax afterwards: repairing turns a
    stray ``I-X`` into ``B-X`` and splits entities, while decoding picks the
    best sequence among the valid ones.

    Args:
        scores: (B, N, L) per-word label scores, N words at most.
        lengths: (B,) number of real words of each sentence.
        labels: the L label names (BIO).
        prior: tag-bigram log-probabilities and their weight (see `TransitionPrior`).
    Returns:
        B lists of label ids, sentence b of length lengths[b].
    """
    start, trans = allowed_transitions(labels)
    scores = scores.float()
    b, n, n_labels = scores.shape
    if n == 0:
        return [[] for _ in range(b)]
    neg = torch.tensor(float("-inf"), device=scores.device)
    start_pen = torch.where(start.to(scores.device), 0.0, neg)  # (L,)
    trans_pen = torch.where(trans.to(scores.device), 0.0, neg)  # (L, L)
    if prior is not None and prior.weight:
        start_pen = start_pen + prior.weight * prior.start.to(scores.device)
        trans_pen = trans_pen + prior.weight * prior.trans.to(scores.device)
    lengths = lengths.to(scores.device)
    dp = scores[:, 0] + start_pen  # (B, L)
    back = torch.zeros(b, n, n_labels, dtype=torch.long, device=scores.device)
    keep = torch.arange(n_labels, device=scores.device).expand(b, n_labels)
    for t in range(1, n):
        cand = dp[:, :, None] + trans_pen  # (B, L_prev, L_next)
        best, arg = cand.max(dim=1)  # (B, L)
        live = (t < lengths)[:, None]  # (B, 1): padding words carry the state through
        dp = torch.where(live, best + scores[:, t], dp)
        back[:, t] = torch.where(live, arg, keep)
    last = dp.argmax(dim=1)  # (B,)
    path = torch.zeros(b, n, dtype=torch.long, device=scores.device)
    path[:, n - 1] = last
    for t in range(n - 1, 0, -1):
        path[:, t - 1] = back[:, t].gather(1, path[:, t : t + 1]).squeeze(1)
    rows = path.cpu().tolist()
    return [row[: int(k)] for row, k in zip(rows, lengths.cpu().tolist())]


def is_valid_bio(tags: Sequence[str]) -> bool:
    """True when every ``I-X`` follows ``B-X`` or ``I-X`` (and the first tag is not ``I-``)."""
    prev = OUTSIDE
    for tag in tags:
        if tag.startswith("I-") and tag_type(prev) != tag[2:]:
            return False
        prev = tag
    return True


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of a valid BIO sequence: (type, first word, last word + 1)."""
    spans: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-"):
            spans.append((tag[2:], i, i + 1))
        elif tag.startswith("I-") and spans and spans[-1][2] == i and spans[-1][0] == tag[2:]:
            spans[-1] = (spans[-1][0], spans[-1][1], i + 1)
    return spans


# ----------------------------------------------------------------------------
# Words with character offsets
# ----------------------------------------------------------------------------

# CoNLL-2003-like word splitting on raw text: abbreviations (U.S.), a possessive
# 's split off its word (Germany 's), words with inner apostrophes or hyphens
# (O'Neill, Jean-Pierre), and every other non-space character on its own.
_WORD = re.compile(
    r"""
      (?:[^\W\d_]\.){2,}          # U.S. e.g.
    | \w+(?=['’][sS]\b)           # Germany  in  Germany's
    | ['’][sS]\b                  # 's
    | \w+(?:['’\-]\w+)*           # words, numbers, O'Neill, Jean-Pierre
    | [^\w\s]                     # punctuation, symbols, emoji: one character each
    """,
    re.VERBOSE,
)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words of `text` and their character offsets: [(word, start, end)], text[start:end] == word."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def entity_dicts(
    text: str, words: Sequence[tuple[str, int, int]], tags: Sequence[str]
) -> list[dict]:
    """``{"type", "text", "start", "end"}`` per entity, offsets into `text` (end exclusive)."""
    out = []
    for typ, first, last in bio_spans(tags):
        start, end = words[first][1], words[last - 1][2]
        out.append({"type": typ, "text": text[start:end], "start": start, "end": end})
    return out


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


def inference_batches(lengths: Sequence[int], budget: int) -> list[np.ndarray]:
    """Indices grouped by similar length so that examples x longest <= `budget` (input order kept per length)."""
    from trainformer.data.batching import length_sorted_batches

    if not len(lengths):
        return []
    return length_sorted_batches(np.asarray(lengths), budget, np.arange(len(lengths)))


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

    def data_report(self) -> dict[str, Any]:
        return self.report

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
        assert self.tokenizer is not None
        self.tokenizer.save(model_dir / "tokenizer.json")
        save_labels(model_dir, self.labels)


def read_eval_file(args, reader: Callable[..., ReadResult[Any]], expected: str) -> ReadResult[Any]:
    """`trainformer evaluate --data FILE` read with `reader` under ``--bad-lines``; an error if nothing is usable."""
    path = Path(args.data)
    if not path.is_file():
        raise UserError(f"--data: file not found: {path}")
    result = reader(path, bad_lines=getattr(args, "bad_lines", "skip"))
    if not result.examples:
        raise UserError(f"{path}: no usable examples (expected {expected})")
    return result

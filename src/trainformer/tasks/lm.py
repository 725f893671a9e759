"""Causal language modelling: English text -> packed rows -> `Decoder` -> perplexity.

Data: `DataConfig.dataset` names one source or several joined by ``+``
(``tinystories+tinyshakespeare+dailydialog``); names and paths mix. Of a
named data set with official splits only the ``train`` file is read, so
DailyDialog's validation and test dialogues — the chat task's evaluation
data — never reach pretraining. A DailyDialog dialogue becomes one document
(its utterances on separate lines, detokenised by `clean_dailydialog`); a
``.txt`` path whose lines end with ``__eou__`` is read as DailyDialog.

Documents are deduplicated and split into train/valid/test by document
(`data.splits.make_splits`, keyed on the lowercased text), shuffled once
(seeded), tokenised with byte-level BPE and packed into rows of
``data.seq_len + 1`` tokens (`data.packing`); ``data.doc_attention`` keeps
attention inside documents via the Decoder's ``doc_ids``. The tokenizer
reserves the chat role markers (`data.chat_template.CHAT_SPECIAL_TOKENS`), so a
chat model fine-tuned from this one keeps the same vocabulary.

Metric: perplexity (lower is better) over every token of the valid split:
its documents joined and cut into windows of ``seq_len``, the tail padded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import DataConfig
from trainformer.data import readers
from trainformer.data.batching import IGNORE_INDEX, TokenBudgetSampler, pad_to_array
from trainformer.data.cache import Ragged, file_hash, tokenize_cached
from trainformer.data.chat_template import reserve_chat_tokens
from trainformer.data.packing import PackedRows, collate_packed, join_documents, pack_documents
from trainformer.data.registry import DATASETS, read_file, resolve_dataset
from trainformer.data.splits import make_splits
from trainformer.data.tokenizer import EOS_ID, PAD_ID, load_or_train_tokenizer
from trainformer.errors import ConfigError
from trainformer.inference.sampling import SamplingSettings, prompt_ids, sample_ids
from trainformer.models import build_model
from trainformer.training.loss import cross_entropy_sum
from trainformer.training.task import Batch, StatefulBatches, Task

SAMPLE_PROMPTS = ("once upon a time", "ROMEO:", "Hello, how are you today?")

# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------

_SPACE_BEFORE = re.compile(r" +([,.!?;:%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$]) +")
_APOSTROPHE = re.compile(r"(\w) ?' ?(s|m|t|re|ve|ll|d)\b", re.IGNORECASE)


def clean_dailydialog(text: str) -> str:
    """DailyDialog's space-tokenised text back to ordinary writing.

    ``"I ’ m fine , thanks !"`` -> ``"I'm fine, thanks!"``: the model then
    writes (and reads) text the way a user types it. Applied alike to
    training and evaluation text.
    """
    text = text.replace("’", "'").replace("‘", "'")
    text = _APOSTROPHE.sub(r"\1'\2", text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    return " ".join(text.split())


def source_names(dataset: str) -> list[str]:
    """``"a+b+c"`` -> ``["a", "b", "c"]`` (names or paths)."""
    names = [n.strip() for n in dataset.split("+")]
    if not all(names):
        raise ConfigError(f"data.dataset: expected names or paths joined by '+', got {dataset!r}")
    return names


def _as_text(example: Any) -> str:
    if isinstance(example, readers.Document):
        return example.text
    return "\n".join(clean_dailydialog(u) for u in example.utterances)  # a Dialogue


def looks_like_dailydialog(path: Path, lines: int = 5) -> bool:
    """True when the first non-blank lines of a file all end with ``__eou__``."""
    seen = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                seen.append(raw.rstrip().endswith(readers.EOU.encode()))
            if len(seen) >= lines:
                break
    return bool(seen) and all(seen)


def read_documents(cfg: DataConfig) -> tuple[list[str], list[Path], dict[str, Any]]:
    """Documents of every source in `cfg.dataset` (train files only).

    Returns (documents in source order, files read, report per source).
    """
    docs: list[str] = []
    files: list[Path] = []
    report: dict[str, Any] = {}
    for name in source_names(cfg.dataset):
        sub = dataclasses.replace(cfg, dataset=name)
        fmt, paths = resolve_dataset(sub)
        if fmt not in ("text", "dailydialog"):
            raise ConfigError(
                f"data.dataset: {name!r} is {fmt} data; language modelling reads text or dailydialog"
            )
        spec = DATASETS.get(name)
        if spec is None and fmt == "text" and cfg.format is None and looks_like_dailydialog(paths["train"]):
            fmt = "dailydialog"  # a .txt file in DailyDialog's format
        result = read_file(fmt, paths["train"], sub, **(spec.options if spec else {}))
        texts = [_as_text(e) for e in result.examples]
        docs += texts
        files.append(result.path)
        report[name] = {"file": str(result.path), "documents": len(texts), "bad_lines": result.bad.report()}
    return docs, files, report


def document_key(text: str) -> str:
    """Split key of a document: lowercased, whitespace-normalised (case variants share a split)."""
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


class PackedBatches:
    """`StatefulBatches` of packed rows: a fixed number of rows per batch, reshuffled each epoch.

    Yields ids (B, L), labels (B, L) (the next tokens) and doc_ids (B, L).
    The order, resume state and sharding are `TokenBudgetSampler`'s (all rows
    have the same length, so a budget of ``rows_per_batch * L`` tokens cuts
    batches of `rows_per_batch` rows).
    """

    def __init__(self, rows: PackedRows, rows_per_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        width = rows.tokens.shape[1] - 1
        self.rows = rows
        self.sampler = TokenBudgetSampler(
            np.full(len(rows), width), max(1, rows_per_batch) * width, seed, True, rank, world_size
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            batch = collate_packed(self.rows, idx)
            yield {"ids": batch["ids"], "labels": batch["targets"], "doc_ids": batch["doc_ids"]}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class CausalBatches:
    """`StatefulBatches` of whole sequences padded per batch, for unpacked LM and chat.

    Each example has token ids and a loss mask (True = the token is a
    target); token-budget batches of similar lengths (`TokenBudgetSampler`)
    are collated by `collate_causal`.
    """

    def __init__(self, ids: Ragged, loss: Ragged, max_tokens: int, seed: int, rank: int = 0, world_size: int = 1):
        self.ids, self.loss = ids, loss
        self.sampler = TokenBudgetSampler(ids.lengths() - 1, max_tokens, seed, True, rank, world_size)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            yield collate_causal(self.ids.take(idx), self.loss.take(idx))

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def collate_causal(ids: Sequence[Sequence[int]], loss: Sequence[Sequence[int]]) -> Batch:
    """Next-token batch of whole sequences, right-padded.

    Args:
        ids: token ids per example (N_i each); loss: 1 where the token is a target.
    Returns:
        ids (B, T) long inputs (tokens 0..N_i-2, padded with <pad>), mask (B, T)
        bool real inputs, labels (B, T) long: token t+1 where it carries loss, else -100.
    """
    inputs = [np.asarray(s[:-1]) for s in ids]
    targets = [np.where(np.asarray(m[1:], dtype=bool), np.asarray(s[1:]), IGNORE_INDEX) for s, m in zip(ids, loss)]
    lens = np.fromiter(map(len, inputs), dtype=np.int64, count=len(inputs))
    width = int(lens.max())
    return {
        "ids": torch.from_numpy(pad_to_array(inputs, PAD_ID, width)),
        "mask": torch.from_numpy(np.arange(width) < lens[:, None]),
        "labels": torch.from_numpy(pad_to_array(targets, IGNORE_INDEX, width)),
    }


def eval_rows(docs: Ragged, seq_len: int, sep_id: int = EOS_ID) -> dict[str, torch.Tensor]:
    """Every token of `docs` as a target exactly once, in windows of `seq_len` (tail padded).

    Like `pack_documents` but the last partial window is kept, padded, with
    label -100 on the padding, so small files are scored whole.
    Returns ids (R, L), labels (R, L), doc_ids (R, L) long.
    """
    stream, doc = join_documents(docs, sep_id)  # (T,), (T,)
    n_targets = max(len(stream) - 1, 0)
    n_rows = max(-(-n_targets // seq_len), 1)
    pad = n_rows * seq_len + 1 - len(stream)
    stream = np.concatenate([stream, np.full(pad, PAD_ID, np.int32)])
    doc = np.concatenate([doc, np.full(pad, doc[-1] + 1 if len(doc) else 0)])
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)  # (R, L+1)
    tokens = torch.from_numpy(stream[idx].astype(np.int64))
    labels = tokens[:, 1:].clone()
    labels[torch.from_numpy(idx[:, 1:] > n_targets)] = IGNORE_INDEX  # (R, L)
    doc_ids = torch.from_numpy((doc[idx[:, :-1]] - doc[idx[:, :1]]).astype(np.int64))
    return {"ids": tokens[:, :-1], "labels": labels, "doc_ids": doc_ids}


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def causal_logits(model: nn.Module, batch: Batch, doc_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), labels (B, T)) of a batch from `PackedBatches`, `CausalBatches` or `eval_rows`.

    Right padding needs no attention mask (causality hides it), which keeps
    SDPA on its fast path.
    """
    doc_ids = batch.get("doc_ids") if doc_attention else None
    return model(batch["ids"], doc_ids=doc_ids), batch["labels"]


def causal_loss(model: nn.Module, batch: Batch, label_smoothing: float = 0.0, doc_attention: bool = False):
    """(loss sum, target count) of `causal_logits`."""
    return cross_entropy_sum(*causal_logits(model, batch, doc_attention), label_smoothing)


def perplexity(
    score: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[Batch] | Iterator[Batch],
    device: torch.device,
) -> dict[str, float]:
    """Mean cross-entropy over all target tokens of `batches`, and its exp (perplexity)."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n = score({k: v.to(device) for k, v in batch.items()})
        total += float(loss_sum)
        count += float(n)
    loss = total / max(count, 1.0)
    return {"ppl": math.exp(min(loss, 50.0)), "loss": loss, "tokens": int(count)}


def row_batches(rows: dict[str, torch.Tensor], batch_rows: int, limit: int = 0) -> Iterator[Batch]:
    """Slices of `batch_rows` rows (the first `limit` rows only, if > 0)."""
    n = len(rows["ids"]) if not limit else min(limit, len(rows["ids"]))
    for i in range(0, n, max(batch_rows, 1)):
        yield {k: v[i : min(i + batch_rows, n)] for k, v in rows.items()}


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


class LanguageModelTask(Task):
    main_metric = "ppl"
    higher_is_better = False

    # ------------------------------------------------------------------ data
    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        d = self.cfg.data
        docs, files, sources = read_documents(d)
        if not docs:
            raise ConfigError(f"data.dataset: no documents in {d.dataset!r}")
        splits = make_splits(
            rows=docs, keys=[document_key(t) for t in docs], valid_size=d.valid_size,
            test_size=d.test_size, seed=d.split_seed, group_rule="document, lowercased, whitespace-normalised",
        )
        data_key = ":".join([*(file_hash(f) for f in files), str(d.split_seed), str(d.valid_size), str(d.test_size)])
        # shuffled once, so that packed rows mix the sources; fixed by the split seed
        train_rows = np.random.default_rng(d.split_seed).permutation(splits.train)
        train_rows = train_rows[: d.limit] if d.limit else train_rows
        self.tokenizer = load_or_train_tokenizer(
            lambda: (docs[i] for i in train_rows), d.tokenizer, cache_key=f"lm:{data_key}:{d.limit}"
        )
        reserve_chat_tokens(self.tokenizer)
        self.docs = {
            name: tokenize_cached({"text": [docs[i] for i in rows]}, self.tokenizer, f"lm:{data_key}:{name}:{d.limit}")["text"]
            for name, rows in (("train", train_rows), ("valid", splits.valid), ("test", splits.test))
        }
        self.rank, self.world_size = rank, world_size
        self.cfg.model.vocab_size = self.tokenizer.vocab_size
        self._check_window()
        self.report = {
            "sources": sources,
            "splits": splits.report(),
            "tokens": {k: int(v.lengths().sum()) for k, v in self.docs.items()},
            "vocab_size": self.tokenizer.vocab_size,
        }
        self.write_data_report(run_dir, rank)

    def _check_window(self) -> None:
        if self.cfg.data.seq_len > self.cfg.model.max_len:
            raise ConfigError(
                f"data.seq_len: expected <= model.max_len={self.cfg.model.max_len}, got {self.cfg.data.seq_len}"
            )

    def has_split(self, split: str) -> bool:
        return len(self.docs.get(split, [])) > 0

    def train_batches(self) -> StatefulBatches:
        d, seed = self.cfg.data, self.cfg.train.seed
        train = self.docs["train"]
        if d.pack:
            rows = pack_documents(train, d.seq_len, EOS_ID)
            if len(rows) == 0:
                raise ConfigError(f"data.seq_len: the training text is shorter than one row of {d.seq_len} tokens")
            return PackedBatches(rows, d.max_tokens // d.seq_len, seed, self.rank, self.world_size)
        # unpacked: each document (+ </s>) cut to seq_len + 1 tokens, padded per batch
        seqs = [np.append(s, EOS_ID)[: d.seq_len + 1] for s in train.take(range(len(train)))]
        ids = Ragged.from_lists(seqs)
        loss = Ragged(np.ones_like(ids.values), ids.offsets)
        return CausalBatches(ids, loss, d.max_tokens, seed, self.rank, self.world_size)

    # ----------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        if self.cfg.model.family != "decoder":
            raise ConfigError(f"model.family: the {self.cfg.task} task needs 'decoder', got {self.cfg.model.family!r}")
        return build_model(self.cfg.model)

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_logits(model, batch, self.cfg.data.doc_attention)

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch["mask"].sum()) if "mask" in batch else int(batch["ids"].numel())

    # ------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        d = self.cfg.data
        rows = eval_rows(self.docs[split], d.seq_len)
        limit = self.cfg.eval.max_examples if split == "valid" else 0
        batch_rows = max(1, self.cfg.eval.batch_tokens // d.seq_len)
        device = next(model.parameters()).device
        return perplexity(lambda b: causal_loss(model, b, 0.0, d.doc_attention),
                          row_batches(rows, batch_rows, limit), device)

    def samples(self, model: nn.Module) -> list[str]:
        assert self.tokenizer is not None
        settings = SamplingSettings(max_new_tokens=40, seed=self.cfg.train.seed)
        prompts = [prompt_ids(self.tokenizer, p, self.cfg.model.max_len, 40) for p in SAMPLE_PROMPTS]
        outs = sample_ids(model, prompts, settings, EOS_ID, precision=self.cfg.train.precision)
        return [f"{p} >>> {self.tokenizer.decode(o)}" for p, o in zip(SAMPLE_PROMPTS, outs)]

"""Masked-language-model pretraining of the encoder (BERT, Devlin et al. 2019).

Text: the *train* files of the data sets named in ``data.dataset``, joined
with ``+`` (e.g. ``conll2003+wnut17+semeval2010+tatoeba-en-fr``), or a text
file. Tagged sentences are joined with spaces, SemEval sentences lose their
entity markers, Tatoeba gives its English side of the translation task's
*train* split only (the split of the ``translate-en-fr`` recipe, so none of
its valid/test sentences is seen). No valid or test file of any data set is
read. A valid split for perplexity is carved from these texts (grouped by
the lowercased text). RUN_DIR/data.json lists what was used.

Tokenizer: WordPiece trained on the training texts, plus the entity markers
``<e1> </e1> <e2> </e2>`` as special tokens, so that a relation model
fine-tuned from this one has the same vocabulary (and embedding shape).

Batches: with ``data.pack`` (default) texts are joined with ``<sep>`` and cut
into rows of ``data.seq_len`` tokens (no padding); otherwise each text is a
row ``<cls> text <sep>`` (cut to seq_len), padded in length-sorted batches.
Masking is dynamic (RoBERTa style: drawn anew for every batch, from the seed
and the batch's position, so a resumed run masks exactly as an uninterrupted
one): ``data.mlm_probability`` of the ordinary tokens are predicted; 80% of
them are replaced by ``<mask>``, 10% by a random token, 10% left as they are.

Metrics: masked-token accuracy and perplexity (exp of the mean cross-entropy
over the predicted tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import DataConfig, load_recipe
from trainformer.data.batching import IGNORE_INDEX, TokenBudgetSampler, pad_to_array
from trainformer.data.cache import Ragged, texts_hash, tokenize_cached
from trainformer.data.markers import MARKERS, add_marker_tokens, strip_entity_markers
from trainformer.data.packing import pack_documents
from trainformer.data.readers import Dialogue, Document, RelationExample, TaggedSentence
from trainformer.data.registry import DATASETS, read_file, read_translation_pairs, resolve_dataset
from trainformer.data.splits import make_splits
from trainformer.data.tokenizer import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    TextTokenizer,
    load_or_train_tokenizer,
)
from trainformer.errors import DataError
from trainformer.generation.steppers import eval_mode
from trainformer.inference.common import inference_autocast
from trainformer.models import Encoder, build_model
from trainformer.tasks.lm import perplexity
from trainformer.tasks.translation import split_key
from trainformer.training.loss import cross_entropy_sum
from trainformer.training.task import Batch, StatefulBatches, Task

# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------


def example_texts(example: Any) -> list[str]:
    """The plain text(s) of one example of any reader."""
    if isinstance(example, TaggedSentence):
        return [" ".join(example.tokens)]
    if isinstance(example, RelationExample):
        return [strip_entity_markers(example.sentence)[0]]
    if isinstance(example, Dialogue):
        return list(example.utterances)
    if isinstance(example, Document):
        return [example.text]
    raise TypeError(f"no text in a {type(example).__name__}")


def tatoeba_train_english(cfg: DataConfig) -> list[str]:
    """English sentences of the translation task's train split (its valid/test groups left out).

    The split is the one `TranslationTask` makes with the ``translate-en-fr``
    recipe's sizes and seed, so a translation test sentence never reaches MLM.
    """
    t = load_recipe("translate-en-fr").data
    result, _ = read_translation_pairs(replace(t, dataset=cfg.dataset, format=cfg.format, bad_lines=cfg.bad_lines))
    pairs = result.examples
    splits = make_splits(
        rows=[(p.src, p.tgt) for p in pairs], keys=[split_key(p.src) for p in pairs],
        valid_size=t.valid_size, test_size=t.test_size, seed=t.split_seed,
    )
    return list(dict.fromkeys(pairs[i].src for i in splits.train))  # a sentence once, first order


def source_texts(name: str, cfg: DataConfig) -> tuple[list[str], dict[str, Any]]:
    """Training texts of one source (a dataset name or a path) and what was read."""
    one = replace(cfg, dataset=name)
    fmt, files = resolve_dataset(one)
    if fmt in ("tsv", "parallel", "jsonl"):
        texts = tatoeba_train_english(one)
        return texts, {"file": str(files["train"]), "split": "train split of translate-en-fr", "texts": len(texts)}
    spec = DATASETS.get(name)
    # a text file given by path: one text per line (a named data set says how it is laid out)
    options = spec.options if spec else {"doc_sep": "line"}
    result = read_file(fmt, files["train"], one, **options)
    texts = [t for e in result.examples for t in example_texts(e)]
    return texts, {"file": str(files["train"]), "split": "train", "texts": len(texts), "bad_lines": result.bad.total}


def mlm_texts(cfg: DataConfig) -> tuple[list[str], dict[str, Any]]:
    """Every source of ``data.dataset`` (``a+b+c``): distinct non-empty texts and a per-source report."""
    texts: list[str] = []
    report = {}
    for name in (n.strip() for n in cfg.dataset.split("+")):
        if not name:
            raise DataError(f"data.dataset: empty name in {cfg.dataset!r}; expected names joined by '+'")
        got, report[name] = source_texts(name, cfg)
        texts += got
    distinct = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    return distinct, report


# ----------------------------------------------------------------------------
# Rows and masking
# ----------------------------------------------------------------------------


def regular_id_range(tokenizer: TextTokenizer) -> tuple[int, int]:
    """[lo, hi) of the ordinary vocabulary: after the fixed specials, before added markers."""
    added = [i for i in (tokenizer.token_to_id(m) for m in MARKERS) if i is not None]
    return len(SPECIAL_TOKENS), min(added, default=tokenizer.vocab_size)


def packed_rows(docs: Ragged, seq_len: int) -> Ragged:
    """Texts joined with <sep> and cut into rows of exactly `seq_len` tokens (the tail dropped)."""
    rows = pack_documents(docs, seq_len, SEP_ID).tokens[:, :seq_len]  # (R, L): rows do not overlap
    offsets = np.arange(len(rows) + 1, dtype=np.int64) * seq_len
    return Ragged(np.ascontiguousarray(rows).reshape(-1).astype(np.int32), offsets)


def single_rows(docs: Ragged, seq_len: int) -> Ragged:
    """One row ``<cls> text <sep>`` per text, cut to `seq_len` tokens."""
    keep = seq_len - 2
    return Ragged.from_lists([[CLS_ID, *docs[i][:keep].tolist(), SEP_ID] for i in range(len(docs))])


def mask_tokens(
    ids: np.ndarray, prob: float, lo: int, hi: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of a padded batch.

    Args:
        ids: (B, S) token ids; only ordinary ids (lo <= id < hi) may be chosen.
        prob: share of ordinary tokens to predict.
        lo, hi: the ordinary-id range, also the range of random replacements.
    Returns:
        inputs (B, S): chosen tokens -> 80% <mask>, 10% random, 10% unchanged;
        labels (B, S): the original id where chosen, -100 elsewhere.
    """
    chosen = (rng.random(ids.shape) < prob) & (ids >= lo) & (ids < hi)  # (B, S)
    roll = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (roll < 0.8)] = MASK_ID
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = rng.integers(lo, hi, size=int(rand.sum()))
    labels = np.where(chosen, ids, IGNORE_INDEX)
    return inputs, labels


def masked_batch(rows: list[np.ndarray], prob: float, lo: int, hi: int, rng: np.random.Generator) -> Batch:
    """ids (B, S), mask (B, S) bool, labels (B, S) (-100 where nothing is predicted)."""
    ids = pad_to_array(rows, PAD_ID)
    inputs, labels = mask_tokens(ids, prob, lo, hi, rng)
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return {
        "ids": torch.from_numpy(inputs),
        "mask": torch.from_numpy(np.arange(ids.shape[1]) < lens[:, None]),
        "labels": torch.from_numpy(labels),
    }


class MaskedBatches:
    """`StatefulBatches` of masked rows: a sampler's batches, masked from (seed, rank, epoch, position)."""

    def __init__(self, sampler: TokenBudgetSampler, rows: Ragged, prob: float, lo: int, hi: int):
        self.sampler, self.rows = sampler, rows
        self.prob, self.lo, self.hi = prob, lo, hi

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler:
            s = self.sampler
            # position is already advanced past this batch; rank: ranks draw different masks
            rng = np.random.default_rng([s.seed, s.rank, s.epoch, s.position])
            yield masked_batch(self.rows.take(idx), self.prob, self.lo, self.hi, rng)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def mlm_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits (N, V) at the N `chosen` positions only.

    A plain `Encoder` runs its head on the chosen ~15% of positions: with a
    16k vocabulary the full (B, S, V) projection costs as much as the whole
    encoder. A wrapped model (DDP, compile) must go through its forward, so
    it computes every position and we select afterwards (same values).
    """
    if isinstance(model, Encoder):
        h = model.hidden(ids, mask)[chosen]  # (N, D)
        return model.head(h, model.tok_embed.weight)  # (N, V)
    return model(ids, mask)[chosen]


def masked_lm_scores(
    model: nn.Module, rows: Ragged, tokenizer: TextTokenizer, prob: float, batch_rows: int,
    seed: int = 0, precision: str = "auto",
) -> dict[str, float]:
    """Masked-token accuracy (%) and perplexity over `rows`, with masking fixed by `seed`."""
    lo, hi = regular_id_range(tokenizer)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    batches = (
        masked_batch(rows.take(range(i, min(i + batch_rows, len(rows)))), prob, lo, hi, rng)
        for i in range(0, len(rows), batch_rows)
    )
    correct = 0

    def score(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal correct
        chosen = batch["labels"] != IGNORE_INDEX
        logits = mlm_logits(model, batch["ids"], batch["mask"], chosen).float()  # (N, V)
        target = batch["labels"][chosen]
        correct += int((logits.argmax(-1) == target).sum())
        return cross_entropy_sum(logits, target)

    with eval_mode(model), inference_autocast(device, precision):
        out = perplexity(score, batches, device)
    return {"ppl": round(out["ppl"], 3), "accuracy": round(100.0 * correct / max(out["tokens"], 1), 2),
            "loss": round(out["loss"], 4), "masked_tokens": out["tokens"]}


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


class MaskedLMTask(Task):
    main_metric = "ppl"
    higher_is_better = False

    @property
    def vocab_scored_share(self) -> float:  # the head runs on the masked positions only
        return self.cfg.data.mlm_probability

    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        d = self.cfg.data
        texts, sources = mlm_texts(d)
        splits = make_splits(
            rows=texts, keys=[t.lower() for t in texts], valid_size=d.valid_size, test_size=0,
            seed=d.split_seed, group_rule="text, lowercased",
        )
        train_idx = splits.train[: d.limit] if d.limit else splits.train
        train = [texts[i] for i in train_idx]
        valid = [texts[i] for i in splits.valid]
        self.tokenizer = load_or_train_tokenizer(lambda: iter(train), d.tokenizer, cache_key=texts_hash(train))
        add_marker_tokens(self.tokenizer)
        self.rows = self._rows(train)
        self.valid_rows = self._rows(valid)
        if len(self.rows) == 0:
            raise DataError(f"data.dataset {d.dataset!r}: too little text for one row of {d.seq_len} tokens")
        self.rank, self.world_size = rank, world_size
        self.cfg.model.vocab_size = self.tokenizer.vocab_size
        self.cfg.model.head = "mlm"
        self.report = {
            "dataset": d.dataset,
            "text_used": "train files/splits only; no valid or test file of any data set was read",
            "sources": sources,
            "distinct_texts": len(texts),
            "mlm_splits": splits.report(),
            "rows": {"train": len(self.rows), "valid": len(self.valid_rows)},
            "train_tokens": int(self.rows.lengths().sum()),
            "packed": d.pack,
            "seq_len": d.seq_len,
        }
        self.write_data_report(run_dir, rank)

    def _rows(self, texts: list[str]) -> Ragged:
        assert self.tokenizer is not None
        if not texts:
            return Ragged.from_lists([])
        docs = tokenize_cached({"ids": texts}, self.tokenizer)["ids"]
        d = self.cfg.data
        seq_len = min(d.seq_len, self.cfg.model.max_len)
        return packed_rows(docs, seq_len) if d.pack else single_rows(docs, seq_len)

    def has_split(self, split: str) -> bool:
        return split == "valid" and len(self.valid_rows) > 0  # no test text is ever read

    def train_batches(self) -> StatefulBatches:
        assert self.tokenizer is not None, "setup() first"
        sampler = TokenBudgetSampler(
            self.rows.lengths(), self.cfg.data.max_tokens, self.cfg.train.seed, True, self.rank, self.world_size
        )
        lo, hi = regular_id_range(self.tokenizer)
        return MaskedBatches(sampler, self.rows, self.cfg.data.mlm_probability, lo, hi)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model)

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        chosen = labels != IGNORE_INDEX  # (B, S)
        return mlm_logits(model, batch["ids"], batch["mask"], chosen), labels[chosen]  # (N, V), (N,)

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        assert self.tokenizer is not None
        rows = self.valid_rows
        limit = self.cfg.eval.max_examples
        if limit and limit < len(rows):
            rows = Ragged(rows.values, rows.offsets[: limit + 1])
        batch_rows = max(1, self.cfg.eval.batch_tokens // max(self.cfg.data.seq_len, 1))
        return masked_lm_scores(model, rows, self.tokenizer, self.cfg.data.mlm_probability, batch_rows,
                                seed=1234, precision=self.cfg.train.precision)

    @torch.inference_mode()
    def samples(self, model: nn.Module) -> list[str]:
        """Fill-mask on a few valid rows: the middle ordinary token masked, the top 3 guesses."""
        assert self.tokenizer is not None
        tok, device = self.tokenizer, next(model.parameters()).device
        lo, hi = regular_id_range(tok)
        out = []
        for i in range(min(self.cfg.eval.samples, len(self.valid_rows))):
            row = self.valid_rows[i][:48].astype(np.int64)
            where = np.flatnonzero((row >= lo) & (row < hi))
            if not len(where):
                continue
            k = int(where[len(where) // 2])
            ids = torch.from_numpy(row.copy())[None].to(device)
            ids[0, k] = MASK_ID
            chosen = torch.zeros_like(ids, dtype=torch.bool)
            chosen[0, k] = True
            logits = mlm_logits(model, ids, torch.ones_like(chosen), chosen)[0]
            guesses = [tok.id_to_token(int(j)) for j in logits.topk(3).indices]
            out.append(f"TEXT: {tok.decode(ids[0].tolist(), skip_special_tokens=False)}\n"
                       f"MASK: {tok.id_to_token(int(row[k]))!r} -> guesses {guesses}")
        return out

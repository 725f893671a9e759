"""Named-entity recognition: token classification on an encoder, scored with seqeval.

Data: CoNLL-style files (CoNLL-2003, WNUT-17, or a path), tags normalised to
BIO (`inference.bio.to_bio`), official splits where the data set has them.
Fine-tuning starts from an MLM-pretrained encoder (`init_from`), whose
tokenizer and shape are taken over (`extraction.inherit_pretrained`).

Labelling: each word's label sits on its first subword; other subwords,
padding and the ``<cls>``/``<sep>`` wrappers carry -100 (no loss).
Decoding (the `Tagger` of `trainformer.inference.tagger`): constrained
Viterbi over the first-subword log-probabilities (`inference.bio.viterbi_bio`),
so the output is always valid BIO, plus a tag-bigram prior counted on the
training tags (`TransitionPrior`, saved as ``model/transitions.json``) whose
weight is chosen on valid at each evaluation unless ``eval.transition_weight``
fixes it. With ``model.crf: true`` the head learns those scores instead,
trained with a linear-chain CRF loss (`trainformer.inference.crf`), and
decoding uses them with weight 1.
Metric: entity-level precision / recall / F1 with seqeval (conlleval
rules), micro-averaged and per type.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from seqeval.metrics import classification_report
from torch import nn

from trainformer.data.batching import IGNORE_INDEX, collate_tagging
from trainformer.data.cache import Ragged, TokenStore, texts_hash, tokenize_words_cached
from trainformer.data.chars import word_bytes
from trainformer.data.readers import TaggedSentence
from trainformer.data.tokenizer import (
    CLS_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    load_or_train_tokenizer,
)
from trainformer.data.windows import per_subword, window_store
from trainformer.inference.bio import (
    OUTSIDE,
    TRANSITIONS_FILE,
    TransitionPrior,
    bio_labels,
    tag_type,
    to_bio,
)
from trainformer.inference.crf import crf_nll, learned_prior, tagging_head, words_of
from trainformer.inference.loading import load_tagger
from trainformer.inference.tagger import Tagger
from trainformer.tasks.extraction import FineTuneTask
from trainformer.training.task import Batch


def score_entities(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level P/R/F1 (seqeval, conlleval rules): micro and per type (``f1_PER``...), in %."""
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    out = {
        "f1": round(100 * float(micro["f1-score"]), 2),
        "precision": round(100 * float(micro["precision"]), 2),
        "recall": round(100 * float(micro["recall"]), 2),
    }
    for typ, row in sorted(report.items()):
        if typ.endswith(" avg"):
            continue
        out[f"f1_{typ}"] = round(100 * float(row["f1-score"]), 2)
    out["entities"] = int(micro["support"])
    return out


# Prior weights tried on valid when eval.transition_weight is not set (0 = validity rules only).
TRANSITION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


def drop_words(batch: Batch, p: float, only: torch.Tensor | None = None, keep_chars: bool = False) -> Batch:
    """`batch` with each word's subwords replaced by <unk> with probability `p` (and, when the
    batch has ``chars``, unless `keep_chars`, the word's bytes by padding, so the character CNN
    cannot see it either).

    A word starts at a labelled position (labels != IGNORE_INDEX) and runs up to the
    next one; <cls>, <sep> and padding are never touched. `only` (B, S) bool, on a word's
    first subword, limits the draw to those words (e.g. the rare ones). Uses the global
    RNG, which checkpoints save, so a resumed run draws the same words.
    """
    ids, labels = batch["ids"], batch["labels"]  # (B, S), (B, S)
    starts = labels != IGNORE_INDEX  # (B, S) first subwords
    word = starts.long().cumsum(1)  # (B, S) 1-based word of each position (0: before the first)
    chosen = starts & (torch.rand(ids.shape, device=ids.device) < p)  # (B, S)
    if only is not None:
        chosen &= only
    dropped = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.bool, device=ids.device)
    dropped.scatter_(1, word.masked_fill(~chosen, 0), chosen)  # (B, S + 1): by word number
    dropped[:, 0] = False
    inside = (ids != PAD_ID) & (ids != CLS_ID) & (ids != SEP_ID)  # (B, S)
    hidden = dropped.gather(1, word) & inside  # (B, S)
    out = {**batch, "ids": ids.masked_fill(hidden, UNK_ID)}
    if "chars" in batch and not keep_chars:
        out["chars"] = batch["chars"].masked_fill(hidden[..., None], 0)  # (B, S, W)
    return out


class TaggingTask(FineTuneTask):
    main_metric = "f1"
    head = "tagging"

    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        splits, report = self.read_splits(
            key=lambda s: " ".join(s.tokens).lower(), row=lambda s: (*s.tokens, "\t", *s.tags),
            group_rule="sentence, lowercased", default_format="conll",
        )
        train = splits["train"]
        examples = [TaggedSentence(s.tokens, to_bio(s.tags), s.line) for s in train.examples]
        self.labels = bio_labels([tag_type(t) for s in examples for t in s.tags if t != OUTSIDE])
        texts = [" ".join(s.tokens) for s in examples]
        self.tokenizer = load_or_train_tokenizer(lambda: iter(texts), self.cfg.data.tokenizer,
                                                 cache_key=texts_hash(texts))
        store = tokenize_words_cached([s.tokens for s in examples], self.tokenizer)
        fields = dict(store.fields)
        if self.cfg.model.char_cnn:
            fields["chars"] = Ragged.from_lists([word_bytes(s.tokens).ravel() for s in examples])
        if self.cfg.data.rare_word_dropout:
            counts = Counter(w for s in examples for w in s.tokens)
            fields["rare"] = Ragged.from_lists([[int(counts[w] == 1) for w in s.tokens] for s in examples])
        label_id = {t: i for i, t in enumerate(self.labels)}
        tag_ids = [[label_id[t] for t in s.tags] for s in examples]
        tags = Ragged.from_lists(tag_ids)
        weight = self.cfg.eval.transition_weight
        self.prior = TransitionPrior.count(tag_ids, len(self.labels), 1.0 if weight is None else weight)
        self._weight_chosen = weight is not None  # False until a valid evaluation has chosen it
        self.eval_sets = {
            name: [TaggedSentence(s.tokens, to_bio(s.tags), s.line) for s in splits[name].examples]
            for name in ("valid", "test")
        }
        self.finish_setup(run_dir, rank, world_size, train, TokenStore({**fields, "tags": tags}), report)

    def pack_train(self) -> dict[str, Any]:
        """With ``data.context_window``, the training sentences (in file order) become windows of
        consecutive sentences (`trainformer.data.windows`), the rows the sampler batches."""
        if not self.cfg.data.context_window:
            return {}
        self.store = window_store(self.store, self.train_index, self.cfg.data.context_window, SEP_ID)
        self.train_index = np.arange(len(self.store))
        self.lengths = self.store.lengths("ids") + 2  # + <cls> and the last <sep>
        return {"train_windows": len(self.store)}

    def collate(self, rows: dict[str, list[np.ndarray]]) -> Batch:
        batch = collate_tagging(rows["ids"], rows["word_ids"], rows["tags"], PAD_ID, CLS_ID, SEP_ID,
                                rows.get("chars"), rows.get("sentence_words"))
        if "rare" in rows:
            rare = per_subword(rows["word_ids"], rows["rare"], batch["ids"].shape[1], start=1, fill=0)  # after <cls>
            batch["rare"] = torch.from_numpy(rare.astype(bool))  # (B, S) on every subword of a rare word
        return batch

    def build_model(self) -> nn.Module:
        """The tagging encoder; a CRF head starts from the counted prior's log-probabilities,
        so the learned transitions begin where the counted ones stand (a checkpoint or
        `init_from` loaded afterwards overrides them)."""
        model = super().build_model()
        if self.cfg.model.crf:
            with torch.no_grad():
                model.head.crf_start.copy_(self.prior.start)
                model.head.crf_trans.copy_(self.prior.trans)
        return model

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["ids"], batch["mask"], chars=batch.get("chars")), batch["labels"]  # (B, S, L), (B, S)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy per word, or with ``model.crf`` the CRF's negative log-likelihood
        per sentence, summed (and divided by the words, like the cross-entropy).

        In training, ``data.word_dropout`` hides whole words (`drop_words`) first, and
        ``data.rare_word_dropout`` the subwords of words seen once in training (not their bytes).
        """
        if model.training and self.cfg.data.word_dropout:
            batch = drop_words(batch, self.cfg.data.word_dropout)
        if model.training and self.cfg.data.rare_word_dropout:
            batch = drop_words(batch, self.cfg.data.rare_word_dropout, only=batch["rare"], keep_chars=True)
        if not self.cfg.model.crf:
            return super().loss(model, batch)
        scores, tags, lengths = words_of(*self.logits(model, batch), batch.get("sentence"))  # (K, N, L), (K, N), (K,)
        head = tagging_head(model)
        nll = crf_nll(scores, tags, lengths, head.crf_start, head.crf_trans, self.labels)
        return nll, lengths.sum().float()

    def tagger(self, model: nn.Module) -> Tagger:
        assert self.tokenizer is not None, "setup() first"
        c = self.cfg
        prior = learned_prior(model) if c.model.crf else self.prior
        return Tagger(model, self.tokenizer, self.labels, c.model.max_len, c.eval.batch_tokens, c.train.precision,
                      prior, c.model.char_cnn > 0, c.data.context_window)

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        """seqeval scores of `split`. On valid, unless ``eval.transition_weight`` is set, every
        weight of TRANSITION_WEIGHTS is tried and the best one kept for test and the model dir
        (a test evaluation in a process that has not chosen one yet, e.g. a resumed run, chooses
        it on valid first). A CRF model decodes with its learned scores (weight 1); valid also
        reports them off."""
        data = self.eval_examples(split)
        if not data:
            return {"f1": 0.0, "sentences": 0}
        if split == "test" and not self._weight_chosen and not self.cfg.model.crf:
            self.evaluate(model, "valid")
        sentences, gold = [s.tokens for s in data], [s.tags for s in data]
        tagger = self.tagger(model)
        extra = {}
        if self.cfg.model.crf:
            weights = (0.0, 1.0) if split == "valid" else (1.0,)
            scored = {w: score_entities(gold, p) for w, p in tagger.tag_each_weight(sentences, weights).items()}
            extra = {"f1_without_prior": scored[0.0]["f1"]} if split == "valid" else {}
            return {**scored[1.0], **extra, "transition_weight": 1.0, "sentences": len(data)}
        if split == "valid" and self.cfg.eval.transition_weight is None:
            tags = tagger.tag_each_weight(sentences, TRANSITION_WEIGHTS)
            scored = {w: score_entities(gold, p) for w, p in tags.items()}
            best = max(scored, key=lambda w: (scored[w]["f1"], -w))  # a tie goes to the smaller weight
            self.prior = self.prior.with_weight(best)
            self._weight_chosen = True
            extra = {"f1_without_prior": scored[0.0]["f1"]}
            result = scored[best]
        else:
            result = score_entities(gold, tagger.tag(sentences))
        return {**result, **extra, "transition_weight": self.prior.weight, "sentences": len(data)}

    def evaluate_model_dir(self, model_dir: Path, split: str) -> dict[str, float]:
        """The scores on `split` of a saved model or ensemble (e.g. of several seeds' runs), decoded
        with the transitions saved there."""
        data = self.eval_examples(split)
        if not data:
            return {"f1": 0.0, "sentences": 0}
        tagger = load_tagger(model_dir, self.cfg.train.device, self.cfg.train.precision)
        return score_tagger(tagger, [s.tokens for s in data], [s.tags for s in data])

    def save_artifacts(self, model_dir: Path) -> None:
        super().save_artifacts(model_dir)
        if self.cfg.model.crf:
            return  # the learned transitions are in the model's weights
        text = json.dumps(self.prior.to_json(self.labels), indent=1) + "\n"
        (model_dir / TRANSITIONS_FILE).write_text(text, encoding="utf-8")

    def samples(self, model: nn.Module) -> list[str]:
        lines = [" ".join(s.tokens) for s in self.sample_examples()]
        return [f"TEXT: {r['text']}\nENTS: " + "; ".join(f"{e['type']}: {e['text']}" for e in r["entities"])
                for r in self.tagger(model).extract(lines)]


def score_tagger(tagger: Tagger, sentences: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """seqeval scores of `tagger`'s BIO tags for `sentences` against `gold` (BIO)."""
    return {**score_entities(gold, tagger.tag(sentences)), "sentences": len(gold)}

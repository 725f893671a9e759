"""Relation classification (SemEval-2010 Task 8): which relation, in which direction, links two marked entities.

Input: a sentence with ``<e1>..</e1>`` and ``<e2>..</e2>`` around the two
nominals. The markers are added special tokens of the tokenizer (never
split), the encoder reads ``<cls> sentence <sep>``, and the ``relation`` head
classifies the concatenated hidden states at the two start markers
(``<e1>``, ``<e2>``; Baldini Soares et al. 2019, "entity start"). Labels are
directed: ``Cause-Effect(e1,e2)`` and ``Cause-Effect(e2,e1)`` differ, plus
``Other`` — 19 for SemEval.

Splits: SemEval ships train and test only; valid is carved from train,
grouped by the sentence without markers (lowercased, punctuation removed),
deterministically in ``data.split_seed``.

Metric: the official score, `semeval_scores`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.data.batching import collate_relations
from trainformer.data.cache import Ragged, TokenStore, texts_hash, tokenize_cached
from trainformer.data.markers import MARKERS, add_marker_tokens, strip_entity_markers
from trainformer.data.tokenizer import TextTokenizer, load_or_train_tokenizer
from trainformer.errors import ConfigError
from trainformer.inference.loading import load_classifier
from trainformer.inference.relations import RelationClassifier
from trainformer.tasks.extraction import FineTuneTask
from trainformer.tasks.translation import split_key
from trainformer.training.task import Batch

OTHER = "Other"
DIRECTIONS = ("e1,e2", "e2,e1")
_DIRECTED = re.compile(r"^(.+)\((e1,e2|e2,e1)\)$")


def relation_type(label: str) -> str:
    """``"Cause-Effect(e2,e1)"`` -> ``"Cause-Effect"``; ``"Other"`` stays."""
    m = _DIRECTED.match(label)
    return m.group(1) if m else label


def relation_labels(train_labels: list[str]) -> list[str]:
    """``Other`` and both directions of every relation type seen in train (19 for SemEval)."""
    types = sorted({relation_type(lab) for lab in train_labels} - {OTHER})
    return [OTHER] + [f"{t}({d})" for t in types for d in DIRECTIONS]


def semeval_scores(gold: list[str], pred: list[str]) -> dict[str, float]:
    """The official SemEval-2010 Task 8 score: (9+1)-way, directionality taken into account.

    As in the official scorer (semeval2010_task8_scorer-v1.2.pl), for each
    relation type R of the gold labels except Other, directions pooled:

        correct(R)  = examples whose predicted label equals the gold label
                      (type AND direction) and whose gold type is R
        proposed(R) = predictions of type R, either direction (a prediction of
                      the right type but the wrong direction counts here and is wrong)
        actual(R)   = gold examples of type R, either direction
        P = correct / proposed,  R = correct / actual,  F1 = 2PR / (P + R)  (0 if undefined)

    ``macro_f1`` is the mean of F1(R) over the types present in the gold labels
    (Other excluded) — the official score; ``micro_*`` pool the counts of those
    types; ``accuracy`` is exact-label accuracy over all examples. All in %.
    """
    if len(gold) != len(pred):
        raise ValueError(f"semeval_scores: {len(gold)} gold labels but {len(pred)} predictions")
    g_type = [relation_type(g) for g in gold]
    p_type = [relation_type(p) for p in pred]
    types = sorted(set(g_type) - {OTHER})
    out: dict[str, float] = {}
    f1s, tot = [], np.zeros(3)
    for t in types:
        correct = sum(g == p and gt == t for g, p, gt in zip(gold, pred, g_type))
        proposed = sum(pt == t for pt in p_type)
        actual = sum(gt == t for gt in g_type)
        p = correct / proposed if proposed else 0.0
        r = correct / actual if actual else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[f"f1_{t}"] = round(100 * f1, 2)
        f1s.append(f1)
        tot += (correct, proposed, actual)
    micro_p = tot[0] / tot[1] if tot[1] else 0.0
    micro_r = tot[0] / tot[2] if tot[2] else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    accuracy = sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)
    return {
        "macro_f1": round(100 * float(np.mean(f1s)) if f1s else 0.0, 2),
        "micro_f1": round(100 * float(micro_f1), 2),
        "micro_precision": round(100 * float(micro_p), 2),
        "micro_recall": round(100 * float(micro_r), 2),
        "accuracy": round(100 * accuracy, 2),
        **out,
    }


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


def _group_key(example) -> str:
    return split_key(strip_entity_markers(example.sentence)[0])


class RelationTask(FineTuneTask):
    main_metric = "macro_f1"
    head = "relation"

    def setup(self, run_dir: Path | None, rank: int = 0, world_size: int = 1) -> None:
        splits, report = self.read_splits(
            key=_group_key, row=lambda e: (e.sentence, e.relation),
            group_rule="sentence without markers, lowercased, punctuation removed", default_format="semeval",
        )
        train = splits["train"]
        examples = train.examples
        self.labels = relation_labels([e.relation for e in examples])
        self.tokenizer = self._tokenizer([strip_entity_markers(e.sentence)[0] for e in examples],
                                         report["pretrained"])
        self.e1_id, self.e2_id = add_marker_tokens(self.tokenizer)
        store = tokenize_cached({"ids": [e.sentence for e in examples]}, self.tokenizer)
        label_id = {lab: i for i, lab in enumerate(self.labels)}
        labels = Ragged.from_lists([[label_id[e.relation]] for e in examples])
        self.eval_sets = {name: splits[name].examples for name in ("valid", "test")}
        self.finish_setup(run_dir, rank, world_size, train, TokenStore({"ids": store["ids"], "label": labels}), report)

    def _tokenizer(self, texts: list[str], pretrained: str | None) -> TextTokenizer:
        tok = load_or_train_tokenizer(lambda: iter(texts), self.cfg.data.tokenizer, cache_key=texts_hash(texts))
        if pretrained is not None and any(tok.token_to_id(m) is None for m in MARKERS):
            # added now, the markers would grow the vocabulary and the pretrained
            # embedding (a shape mismatch) would not be loaded at all
            raise ConfigError(f"init_from: {pretrained}/tokenizer.json has no entity markers "
                              f"({' '.join(MARKERS)}); pretrain with the mlm task, which adds them")
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]]) -> Batch:
        return collate_relations(rows, self.e1_id, self.e2_id)

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["ids"], batch["mask"], batch["e1_pos"], batch["e2_pos"]), batch["labels"]  # (B, L), (B,)

    def classifier(self, model: nn.Module) -> RelationClassifier:
        assert self.tokenizer is not None, "setup() first"
        c = self.cfg
        return RelationClassifier(model, self.tokenizer, self.labels, c.model.max_len, c.eval.batch_tokens,
                                  c.train.precision)

    def evaluate(self, model: nn.Module, split: str = "valid") -> dict[str, float]:
        return self._score(self.classifier(model), split)

    def evaluate_model_dir(self, model_dir: Path, split: str) -> dict[str, float]:
        """The scores on `split` of a saved model or ensemble (e.g. of several seeds' runs)."""
        return self._score(load_classifier(model_dir, self.cfg.train.device, self.cfg.train.precision), split)

    def _score(self, classifier: RelationClassifier, split: str) -> dict[str, float]:
        data = self.eval_examples(split)
        if not data:
            return {"macro_f1": 0.0, "examples": 0}
        return score_relations(classifier, data)

    def samples(self, model: nn.Module) -> list[str]:
        picks = self.sample_examples()
        preds = self.classifier(model).predict([e.sentence for e in picks])
        return [f"TEXT: {e.sentence}\nPRED: {p} ({s:.2f})  GOLD: {e.relation}" for e, (p, s) in zip(picks, preds)]


def score_relations(classifier: RelationClassifier, examples: Sequence[Any]) -> dict[str, float]:
    """The official scores of `classifier`'s predictions for SemEval examples (sentence, relation)."""
    pred = [p for p, _ in classifier.predict([e.sentence for e in examples])]
    return {**semeval_scores([e.relation for e in examples], pred), "examples": len(examples)}

"""Classifying the relation between two marked entities with a trained relation encoder
(or an ensemble of them); the relation task and ``trainformer extract`` share it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.data.batching import collate_relations
from trainformer.data.markers import (
    add_marker_tokens,
    entity_markers_ok,
    marker_positions,
    window_keeping,
)
from trainformer.data.tokenizer import TextTokenizer
from trainformer.errors import DataError
from trainformer.generation.steppers import eval_mode
from trainformer.inference.common import inference_autocast, inference_batches
from trainformer.textio import warn


class RelationClassifier:
    """Batched relation classification of marked sentences with a trained relation encoder,
    or with several (an ensemble: their label distributions are averaged).

    Args:
        model: an `Encoder` with a relation head, or several trained on the same labels and
            tokenizer; tokenizer: its tokenizer (the entity markers are made special tokens).
        labels: label names in id order.
        max_len: the model's window; a longer sentence keeps a window around its markers.
        batch_tokens: padded tokens per inference batch; precision: autocast precision.
    """

    def __init__(
        self, model: nn.Module | Sequence[nn.Module], tokenizer: TextTokenizer, labels: list[str], max_len: int,
        batch_tokens: int = 8000, precision: str = "auto",
    ):
        self.models = list(model) if isinstance(model, Sequence) else [model]
        self.model, self.tokenizer, self.labels = self.models[0], tokenizer, labels
        self.e1_id, self.e2_id = add_marker_tokens(tokenizer)
        self.limit = max_len - 2
        self.batch_tokens, self.precision = batch_tokens, precision
        self.device = next(self.model.parameters()).device
        self.truncated = 0

    def _encode(self, sentences: list[str]) -> list[list[int]]:
        """Token ids of marked sentences; an over-long one keeps a window around its markers (counted)."""
        out = []
        for ids in self.tokenizer.encode_batch(sentences):
            if len(ids) > self.limit:
                ids, _ = window_keeping(ids, self.limit, marker_positions(ids, self.e1_id, self.e2_id))
                self.truncated += 1
            out.append(ids)
        return out

    def predict(self, sentences: list[str]) -> list[tuple[str, float]]:
        """(label, probability) of each marked sentence, in input order."""
        self.truncated = 0
        encoded = self._encode(sentences)
        out: dict[int, tuple[str, float]] = {}
        with eval_mode(*self.models), inference_autocast(self.device, self.precision):
            for batch in inference_batches([len(e) + 2 for e in encoded], self.batch_tokens):
                rows = {"ids": [np.asarray(encoded[b]) for b in batch], "label": [np.zeros(1)] * len(batch)}
                t = collate_relations(rows, self.e1_id, self.e2_id)
                inputs = [t[k].to(self.device) for k in ("ids", "mask", "e1_pos", "e2_pos")]
                probs = sum(torch.softmax(m(*inputs).float(), dim=-1) for m in self.models) / len(self.models)  # (B, L)
                prob, best = probs.max(dim=-1)  # (B,)
                for b, k, p in zip(batch, best.tolist(), prob.tolist()):
                    out[int(b)] = (self.labels[k], p)
        return [out[i] for i in range(len(sentences))]

    def extract(self, lines: list[str], source: str = "<input>") -> list[dict[str, Any]]:
        """``{"text", "relation", "score"}`` per line; an empty line gives relation and score null."""
        for i, line in enumerate(lines, 1):
            if line.strip() and not entity_markers_ok(line):
                raise DataError(f"{source}:{i}: expected one <e1>..</e1> and one <e2>..</e2> around two "
                                "non-overlapping spans")
        todo = [i for i, line in enumerate(lines) if line.strip()]
        preds = dict(zip(todo, self.predict([lines[i] for i in todo])))
        if self.truncated:
            warn(f"{self.truncated} line(s) longer than {self.limit} tokens were truncated around their markers")
        return [
            {"text": line, "relation": preds[i][0], "score": round(preds[i][1], 4)} if i in preds
            else {"text": line, "relation": None, "score": None}
            for i, line in enumerate(lines)
        ]

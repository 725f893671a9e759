"""BIO tags and their constrained decoding, shared by the NER task and the `Tagger`.

- Tags: normalising IOB1/BIOES input to BIO (IOB2), the label set, validity,
  entity spans of a tag sequence.
- Constraints: which tags may start a sentence and follow one another
  (``I-X`` only after ``B-X``/``I-X``); `crf.py` trains under the same ones.
- `TransitionPrior`: tag-bigram log-probabilities (counted on the training
  tags, or a CRF's learned scores) that decoding adds to the per-word scores;
  saved as ``model/transitions.json``.
- `viterbi_bio`: the best valid tag sequence under the scores and the prior.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainformer.errors import UserError

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
# The prior of a model directory, or of an ensemble of them
# ----------------------------------------------------------------------------

TRANSITIONS_FILE = "transitions.json"


def load_prior(path: Path, labels: list[str]) -> TransitionPrior | None:
    """The `TransitionPrior` saved in `path`; None if there is none (model dirs from before
    the prior decode with the BIO validity rules only)."""
    if not path.is_file():
        return None
    try:
        return TransitionPrior.from_json(json.loads(path.read_text(encoding="utf-8")), labels, path)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: expected the tag-transition file a ner run writes ({type(e).__name__}: {e})") from None


def mean_prior(priors: Sequence[TransitionPrior | None], source: str | Path) -> TransitionPrior | None:
    """The weight-1 prior whose scores are the mean of the members' weighted scores (one
    member: its own prior). Members must all have a prior or all lack one."""
    if len(priors) == 1 or all(p is None for p in priors):
        return priors[0]
    if any(p is None for p in priors):
        raise UserError(f"{source}: some members decode with a tag-transition prior and some without")
    start = sum(p.weight * p.start for p in priors) / len(priors)
    trans = sum(p.weight * p.trans for p in priors) / len(priors)
    return TransitionPrior(start, trans, 1.0)

"""Entity markers for relation classification: ``<e1>..</e1>`` and ``<e2>..</e2>`` around two spans.

In text: `entity_markers_ok` (each marker once, spans ordered, non-empty, not
overlapping) and `strip_entity_markers`. As tokens: `add_marker_tokens` makes
them unsplittable special tokens of a tokenizer, `marker_positions` finds the
start markers after tokenisation, and `window_keeping` cuts an over-long
sentence around them. The SemEval reader, the relation and MLM tasks, the
relation classifier and the server all use these; nothing else spells the
markers out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from trainformer.data.tokenizer import TextTokenizer

MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")


# ----------------------------------------------------------------------------
# In text
# ----------------------------------------------------------------------------


def entity_markers_ok(sentence: str) -> bool:
    """True when each marker occurs once and ``<e1>..</e1>``, ``<e2>..</e2>`` are
    ordered, non-empty and do not overlap."""
    if any(sentence.count(m) != 1 for m in MARKERS):
        return False
    a, b, c, d = (sentence.index(m) for m in MARKERS)
    spans_ok = a + 4 < b and c + 4 < d
    return spans_ok and (b < c or d < a)


def strip_entity_markers(sentence: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Sentence without markers and the character spans (start, end) of e1 and e2 in it."""
    spans = {}
    out = []
    pos = 0
    for piece in re.split(r"(</?e[12]>)", sentence):
        if piece in MARKERS:
            spans[piece] = pos
        else:
            out.append(piece)
            pos += len(piece)
    text = "".join(out)
    return text, (spans["<e1>"], spans["</e1>"]), (spans["<e2>"], spans["</e2>"])


# ----------------------------------------------------------------------------
# As tokens
# ----------------------------------------------------------------------------


def add_marker_tokens(tokenizer: TextTokenizer) -> tuple[int, int]:
    """Make the four entity markers unsplittable special tokens; returns the ids of ``<e1>``, ``<e2>``.

    Adding a marker that is already there keeps its id, so a tokenizer
    inherited from MLM pretraining (which adds them too) keeps its size.
    """
    missing = [m for m in MARKERS if tokenizer.token_to_id(m) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer.token_to_id("<e1>"), tokenizer.token_to_id("<e2>")


def marker_positions(ids: Sequence[int], e1_id: int, e2_id: int) -> tuple[int, int]:
    """Indices of the ``<e1>`` and ``<e2>`` start markers in a token sequence (-1 when absent)."""
    arr = np.asarray(ids)
    p1, p2 = np.flatnonzero(arr == e1_id), np.flatnonzero(arr == e2_id)
    return (int(p1[0]) if len(p1) else -1), (int(p2[0]) if len(p2) else -1)


def window_keeping(ids: list[int], limit: int, keep: Sequence[int]) -> tuple[list[int], int]:
    """At most `limit` tokens of `ids`, a window that holds the positions in `keep` when it can.

    Returns (window, start): window == ids[start:start + limit].
    """
    if len(ids) <= limit:
        return ids, 0
    lo = min((k for k in keep if k >= 0), default=0)
    start = max(0, min(lo, len(ids) - limit))
    return ids[start : start + limit], start

"""Consecutive sentences read together: context windows for tagging.

A CoNLL file keeps each news story's sentences in order, and a name that is
ambiguous in one sentence (the headline "JAPAN GET LUCKY WIN , CHINA IN
SURPRISE DEFEAT .") is often plain in the next ("Japan began the defence of
their Asian Cup title ..."). With ``data.context_window: T`` a tagging task
packs consecutive sentences into windows of at most T positions,

    <cls> sentence 1 <sep> sentence 2 <sep> ... sentence k <sep>

and the encoder reads the window at once, while the loss and the decoding
stay per sentence (`sentence_index`). Every token is still computed once, so
a window costs little more than its sentences apart: only the attention
rows grow. Word indexes run on across a window's sentences; a separator
belongs to no word (word index -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainformer.data.cache import Ragged, TokenStore


def window_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive items packed greedily into windows of at most `budget` positions.

    Args:
        lengths: (K,) subwords of each sentence, without wrappers.
        budget: positions of a window: <cls>, then each sentence followed by a <sep>.
            A sentence too long for it alone gets a window of its own.
    Returns:
        the item positions of each window, in order; every item exactly once.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = 1  # <cls>
    for i, n in enumerate(lengths):
        if current and used + int(n) + 1 > budget:
            groups.append(current)
            current, used = [], 1
        current.append(i)
        used += int(n) + 1
    if current:
        groups.append(current)
    return groups


def join_sentences(
    ids_list: Sequence[Sequence[int]], word_ids_list: Sequence[Sequence[int]], n_words: Sequence[int], sep_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One window's subword ids, `sep_id` between sentences, and each subword's word index.

    Args:
        ids_list, word_ids_list: each sentence's subword ids and their word indexes.
        n_words: each sentence's word count (its labels and character rows), by which
            the next sentence's word indexes are shifted.
    Returns:
        ids (S,) and word_ids (S,) int64, -1 on the separators.
    """
    ids: list[np.ndarray] = []
    words: list[np.ndarray] = []
    offset = 0
    for k, (s, w, n) in enumerate(zip(ids_list, word_ids_list, n_words)):
        if k:
            ids.append(np.array([sep_id], dtype=np.int64))
            words.append(np.array([-1], dtype=np.int64))
        ids.append(np.asarray(s, dtype=np.int64))
        words.append(np.asarray(w, dtype=np.int64) + offset)
        offset += int(n)
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(words)


def per_subword(word_ids_list: Sequence[Sequence[int]], word_values_list: Sequence[Sequence[int]],
                width: int, start: int, fill: int = -1) -> np.ndarray:
    """(B, width) int64: each subword's word value (one value per word, a list per row), rows
    shifted by `start` (1 after <cls>); `fill` on wrappers, separators (word -1) and padding."""
    out = np.full((len(word_ids_list), width), fill, dtype=np.int64)
    for row, (w, values) in enumerate(zip(word_ids_list, word_values_list)):
        w = np.asarray(w, dtype=np.int64)
        known = np.flatnonzero(w >= 0)
        out[row, start + known] = np.asarray(values, dtype=np.int64)[w[known]]
    return out


def sentence_index(word_ids_list: Sequence[Sequence[int]], sentence_words_list: Sequence[Sequence[int]],
                   width: int, start: int) -> np.ndarray:
    """(B, width) the batch-wide number of the sentence each subword belongs to, -1 elsewhere.

    Args:
        word_ids_list: each row's word index per subword (-1: a separator).
        sentence_words_list: each row's word count per sentence, in order.
        width: the padded row length; start: where a row's first subword sits (1 after <cls>).
    Sentences are numbered row by row, so a row-major walk meets them in order.
    """
    bases = np.cumsum([0, *(len(c) for c in sentence_words_list)])  # first sentence number of each row
    owners = [np.repeat(np.arange(len(c)), np.asarray(c, dtype=np.int64)) + base  # (words,) each word's sentence
              for c, base in zip(sentence_words_list, bases)]
    return per_subword(word_ids_list, owners, width, start)


def window_store(store: TokenStore, index: np.ndarray, budget: int, sep_id: int) -> TokenStore:
    """A tagging store's rows `index` (sentences, in order) packed into windows.

    Args:
        store: per-sentence fields ``ids``, ``word_ids``, ``tags`` (one per word) and
            optionally ``chars`` (`word_bytes`, flattened); index: the rows to keep.
        budget: positions per window (`window_groups`); sep_id: the separator's id.
    Returns:
        one row per window: ``ids`` and ``word_ids`` joined (`join_sentences`), ``tags``
        and ``chars`` concatenated, and ``sentence_words`` (each sentence's word count).
    """
    index = np.asarray(index, dtype=np.int64)
    out: dict[str, list[np.ndarray]] = {name: [] for name in store.fields}
    out["sentence_words"] = []
    per_word = [name for name in store.fields if name not in ("ids", "word_ids")]  # concatenated as they are
    for group in window_groups(store.lengths("ids")[index], budget):
        rows = index[group]
        counts = [len(store["tags"][r]) for r in rows]
        ids, words = join_sentences([store["ids"][r] for r in rows], [store["word_ids"][r] for r in rows], counts, sep_id)
        out["ids"].append(ids)
        out["word_ids"].append(words)
        for name in per_word:
            out[name].append(np.concatenate([store[name][r] for r in rows]))
        out["sentence_words"].append(np.asarray(counts, dtype=np.int64))
    return TokenStore({name: Ragged.from_lists(rows) for name, rows in out.items()})

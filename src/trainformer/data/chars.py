"""Word characters for the tagging encoder's character CNN (``model.char_cnn``).

Each word becomes a fixed-width row of its UTF-8 bytes (byte + 1; 0 is
padding), so any text has a representation and nothing needs a vocabulary.
A word longer than `CHAR_WIDTH` bytes keeps its first and last halves: the
endings of names ("-ski", "-ov", "-shire") matter as much as their starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHAR_WIDTH = 20  # bytes kept per word


def word_bytes(words: Sequence[str], width: int = CHAR_WIDTH) -> np.ndarray:
    """(N, width) int16: each word's UTF-8 bytes + 1, 0-padded; long words keep head and tail."""
    out = np.zeros((len(words), width), dtype=np.int16)
    head = width // 2
    for i, word in enumerate(words):
        raw = word.encode("utf-8", errors="replace")
        if len(raw) > width:
            raw = raw[:head] + raw[len(raw) - (width - head):]
        out[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8).astype(np.int16) + 1
    return out


def subword_chars(word_chars: np.ndarray, word_ids: Sequence[int], width: int = CHAR_WIDTH) -> np.ndarray:
    """The bytes of the word each subword came from: word_chars (N * width,) or (N, width),
    word_ids (S,) -> (S, width); zeros where the word index is -1 (a separator)."""
    rows = np.asarray(word_chars).reshape(-1, width)
    w = np.asarray(word_ids, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((len(w), width), dtype=rows.dtype)
    return np.where((w >= 0)[:, None], rows[np.maximum(w, 0)], 0)  # word -1 (a separator): no bytes

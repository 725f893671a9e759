"""Packing documents into fixed-length rows for language modelling.

Documents are joined into one stream with ``</s>`` after each, then cut into
rows of ``seq_len + 1`` tokens (inputs are ``row[:-1]``, targets ``row[1:]``).
Consecutive rows overlap by one token (row r starts at ``r * seq_len``), so
every token of the stream is a target exactly once; the tail that does not
fill a row is dropped. No padding at all.

Alongside the tokens, each position carries the index of its document within
the row (``doc_ids``, the separator belongs to the document it ends) and its
position inside that document (``positions``), so attention can be kept
inside documents (`DataConfig.doc_attention`) and positions restarted.
Everything is vectorised numpy: no loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainformer.data.cache import Ragged


@dataclass
class PackedRows:
    """R rows of seq_len + 1 tokens and, per position, its document and position in it."""

    tokens: np.ndarray  # (R, L+1) int32
    doc_ids: np.ndarray  # (R, L+1) int32, 0 for the row's first document
    positions: np.ndarray  # (R, L+1) int32, position within the document (restarted per row)

    def __len__(self) -> int:
        return len(self.tokens)


def join_documents(docs: Ragged, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream of every document followed by `sep_id`, and each position's document.

    Returns:
        stream (T,) int32 and doc (T,) int64, T = total tokens + number of documents.
    """
    lengths = docs.lengths()  # (D,)
    n_docs = len(lengths)
    doc_of_token = np.repeat(np.arange(n_docs), lengths)  # (total,)
    stream = np.empty(int(lengths.sum()) + n_docs, dtype=np.int32)
    # token k of the flat values moves right by the number of separators before it
    stream[np.arange(len(doc_of_token)) + doc_of_token] = docs.values
    ends = docs.offsets[1:] + np.arange(n_docs)  # (D,) where each separator lands
    stream[ends] = sep_id
    doc = np.repeat(np.arange(n_docs), lengths + 1)  # the separator belongs to its document
    return stream, doc


def pack_documents(docs: Ragged, seq_len: int, sep_id: int) -> PackedRows:
    """Pack tokenised documents into rows of `seq_len` + 1 tokens.

    Args:
        docs: token ids per document (no separators).
        seq_len: model context; rows hold one extra token for the shifted target.
        sep_id: end-of-text id (``</s>``) appended to every document.
    Returns:
        `PackedRows` with R = (T - 1) // seq_len rows, T the stream length.
    """
    stream, doc = join_documents(docs, sep_id)
    n_rows = max((len(stream) - 1) // seq_len, 0)
    idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)  # (R, L+1)
    # start of each position's document in the stream, clamped to the row start
    is_start = np.ones(len(stream), dtype=bool)
    is_start[1:] = doc[1:] != doc[:-1]
    doc_start = np.maximum.accumulate(np.where(is_start, np.arange(len(stream)), 0))  # (T,)
    row_start = idx[:, :1]  # (R, 1)
    positions = idx - np.maximum(doc_start[idx], row_start)
    doc_ids = doc[idx] - doc[row_start]
    return PackedRows(stream[idx], doc_ids.astype(np.int32), positions.astype(np.int32))


def collate_packed(rows: PackedRows, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """LM batch of packed rows.

    Returns:
        ids (B, L) long inputs, targets (B, L) long (the next tokens),
        doc_ids (B, L) and positions (B, L) long of the inputs.
    """
    idx = np.asarray(indices, dtype=np.int64)
    tokens = torch.from_numpy(rows.tokens[idx].astype(np.int64))  # (B, L+1)
    return {
        "ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "doc_ids": torch.from_numpy(rows.doc_ids[idx, :-1].astype(np.int64)),
        "positions": torch.from_numpy(rows.positions[idx, :-1].astype(np.int64)),
    }

"""Attention masks and position indices. Boolean masks: True = may attend / real token.

SDPA takes its fastest kernels only without an explicit mask, so these
helpers return ``None`` whenever a mask would allow everything and report
``is_causal=True`` for the plain causal case (no padding, no cache, no
documents), which SDPA handles without materialising a (T, T) mask.
"""

from __future__ import annotations

import torch


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) real-token mask -> (B, 1, 1, S) attention mask (or None).

    A row whose keys are all padding would make softmax NaN on some kernels;
    such a row is opened fully (its output is garbage but finite, and it is a
    padding row that no real token reads).
    """
    if mask is None:
        return None
    mask = mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    return mask | ~mask.any(dim=-1, keepdim=True)


def causal_mask(
    t: int,
    past: int,
    device: torch.device,
    key_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal self-attention mask for T new queries after `past` cached keys.

    Query i (absolute position past + i) may see key j iff j <= past + i, the
    key is real (`key_mask` (B, past + T)) and, with `doc_ids` (B, T) (no
    cache), both tokens belong to the same document. Each query always sees
    itself, so no row is empty. Returns (T, past + T) or (B, 1, T, past + T).
    """
    q_pos = torch.arange(past, past + t, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past + t, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if key_mask is None and doc_ids is None:
        return allowed
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]  # (B, 1, T, S)
    if doc_ids is not None:
        allowed = allowed & same_document(doc_ids)[:, None]  # (B, 1, T, T)
    return allowed | (k_pos == q_pos)  # a query always sees itself: no empty row


def self_attention_mask(
    t: int,
    past: int,
    device: torch.device,
    key_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for causal self-attention, using SDPA's fast paths when possible.

    Args:
        t: new query tokens; past: cached keys before them.
        key_mask: (B, past + T) real-token mask of all keys, or None (no padding).
        doc_ids: (B, T) document index of each token of a packed row, or None.
    """
    if key_mask is None and doc_ids is None:
        if past == 0:
            return None, True  # plain causal: SDPA's own (flash) path
        if t == 1:
            return None, False  # one new token sees the whole cache
    return causal_mask(t, past, device, key_mask, doc_ids), False


def positions_for(
    t: int,
    past: int,
    device: torch.device,
    key_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position index of each new token: (T,) shared, or (B, T) when padding or documents vary it.

    With a key mask (B, past + T), positions count real tokens only, so a
    left-padded row gets the positions it would have unpadded. With doc_ids
    (B, T), positions restart at 0 at each document start of a packed row.
    """
    if doc_ids is not None:  # packed rows (the end of this file)
        return past + document_positions(doc_ids)
    if key_mask is None:
        return torch.arange(past, past + t, device=device)
    counted = key_mask.long().cumsum(dim=1)[:, past:] - 1  # (B, T)
    return counted.clamp(min=0)


# ----------------------------------------------------------------------------
# Packed rows (`data.doc_attention`): several documents in one row, each kept to itself
# ----------------------------------------------------------------------------


def same_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) document index per token -> (B, T, T), True where two tokens share a document."""
    return doc_ids[:, :, None] == doc_ids[:, None, :]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, T) each token's position inside its document (0 at each document start)."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T) start of each doc
    return idx - first

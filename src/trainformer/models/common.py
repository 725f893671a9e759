"""Pieces every family builds from its `ModelConfig`: layer arguments, position encodings, input embedding."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainformer.config import ModelConfig
from trainformer.errors import UserError
from trainformer.nn import (
    KVCache,
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    TokenEmbedding,
)
from trainformer.nn.attention import Rope
from trainformer.nn.layers import dropout
from trainformer.nn.norm import make_norm


def layer_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `EncoderLayer` / `DecoderLayer` taken from the config."""
    return dict(
        n_kv_heads=cfg.n_kv_heads, dropout=cfg.dropout, activation=cfg.activation,
        norm=cfg.norm, norm_first=cfg.norm_first, norm_eps=cfg.norm_eps, bias=cfg.bias,
    )


def final_norm(cfg: ModelConfig) -> nn.Module | None:
    """Pre-norm stacks end with a norm; post-norm stacks are already normalised."""
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.norm_first else None


def token_embedding(cfg: ModelConfig) -> TokenEmbedding:
    return TokenEmbedding(cfg.vocab_size, cfg.d_model, scale=cfg.scale_embedding)


def additive_positions(cfg: ModelConfig) -> nn.Module | None:
    """The table added to token embeddings (sinusoidal or learned); None for rope."""
    if cfg.position == "sinusoidal":
        return SinusoidalPositions(cfg.max_len, cfg.d_model)
    if cfg.position == "learned":
        return LearnedPositions(cfg.max_len, cfg.d_model)
    return None


def rotary(cfg: ModelConfig) -> RotaryEmbedding | None:
    if cfg.position != "rope":
        return None
    return RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.max_len, cfg.rope_theta)


def check_length(length: int, max_len: int, what: str = "sequence") -> None:
    """A clear error instead of an index error deep in an embedding lookup."""
    if length > max_len:
        raise UserError(
            f"{what} of {length} tokens is longer than model.max_len={max_len}; "
            "truncate it or raise model.max_len"
        )


def embed_inputs(
    ids: torch.Tensor,
    positions: torch.Tensor,
    tok_embed: nn.Module,
    pos_embed: nn.Module | None,
    rope: RotaryEmbedding | None,
    drop: nn.Module,
    extra: torch.Tensor | None = None,
    norm: nn.Module | None = None,
) -> tuple[torch.Tensor, Rope | None]:
    """Token ids (B, T) and positions (T,) or (B, T) -> (x (B, T, D), rope (cos, sin) or None).

    `extra` (B, T, D), e.g. word-character features, is added before `norm` (BERT's
    embedding norm, ``model.embed_norm``) and the dropout.
    """
    x = tok_embed(ids)  # (B, T, D)
    if pos_embed is not None:
        x = x + pos_embed(positions)  # (T, D) or (B, T, D) broadcast
    if extra is not None:
        x = x + extra
    if norm is not None:
        x = norm(x)
    return dropout(drop, x), (rope(positions) if rope is not None else None)


def extend_key_mask(
    cache: KVCache | None, mask: torch.Tensor | None, ids: torch.Tensor
) -> torch.Tensor | None:
    """Real-token mask over cached + new tokens (B, P + T), or None when nothing was ever padded.

    The cache keeps it, so padding in a prompt stays masked at every later step.
    """
    past = cache.length if cache is not None else 0
    past_mask = cache.key_mask if cache is not None else None
    if mask is None and past_mask is None:
        return None
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if past and past_mask is None:
        past_mask = torch.ones(ids.shape[0], past, dtype=torch.bool, device=ids.device)
    full = torch.cat([past_mask, mask], dim=1) if past else mask
    if cache is not None:
        cache.key_mask = full
    return full

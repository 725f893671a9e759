"""Decoder-only causal language model (GPT style)."""

from __future__ import annotations

import torch
from torch import nn

from trainformer.config import ModelConfig
from trainformer.models.common import (
    additive_positions,
    check_length,
    embed_inputs,
    extend_key_mask,
    final_norm,
    layer_kwargs,
    rotary,
    token_embedding,
)
from trainformer.nn import DecoderLayer, KVCache, init_weights, scale_residual_projections
from trainformer.nn.masks import positions_for, self_attention_mask


class Decoder(nn.Module):
    """Token embedding -> positions -> causal `DecoderLayer`s (no cross-attention) -> norm -> LM head.

    Parameters: ``tok_embed``, ``pos_embed`` (learned only), ``layers.{i}.*``,
    ``norm`` (pre-norm only), ``lm_head`` (only when ``tie_embeddings`` is off;
    tied, the head is ``tok_embed.weight``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = token_embedding(cfg)
        self.pos_embed = additive_positions(cfg)
        self.rope = rotary(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, **layer_kwargs(cfg)) for _ in range(cfg.n_layers)
        )
        self.norm = final_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        scale_residual_projections(self.layers, cfg.init_std, cfg.n_layers)

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding with `forward(..., cache=...)`."""
        return KVCache(len(self.layers))

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            ids: (B, T) token ids (with a cache: only the new tokens).
            mask: (B, T) bool, True = real token; None = no padding. Right padding
                needs no mask at all (causality already hides it); left padding does.
            cache: `KVCache` from `new_cache()`; updated in place.
            doc_ids: (B, T) document index per token of packed rows: attention stays
                inside each document and positions restart at each document (no cache).
        Returns:
            logits (B, T, V).
        """
        h = self.hidden(ids, mask, cache, doc_ids)
        return self.tok_embed.attend(h) if self.lm_head is None else self.lm_head(h)  # (B, T, V)

    def hidden(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D); arguments as in `forward`."""
        t, past = ids.shape[1], cache.length if cache is not None else 0
        check_length(past + t, self.cfg.max_len)
        if doc_ids is not None and past:
            raise ValueError("doc_ids cannot be combined with a non-empty KV cache")
        key_mask = extend_key_mask(cache, mask, ids)
        positions = positions_for(t, past, ids.device, key_mask, doc_ids)
        attn_mask, is_causal = self_attention_mask(t, past, ids.device, key_mask, doc_ids)
        x, rope = embed_inputs(ids, positions, self.tok_embed, self.pos_embed, self.rope, self.drop)
        for i, layer in enumerate(self.layers):
            kv = cache.self_kv[i] if cache is not None else None
            x = layer(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope, cache=kv)
        if cache is not None:
            cache.length += t
        return self.norm(x) if self.norm is not None else x


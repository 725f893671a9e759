"""Encoder-decoder Transformer for translation (Vaswani et al. 2017)."""

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
from trainformer.nn import (
    DecoderLayer,
    EncoderLayer,
    KVCache,
    init_weights,
    scale_residual_projections,
)
from trainformer.nn.masks import key_padding_mask, positions_for, self_attention_mask


class EncoderDecoder(nn.Module):
    """Encoder stack over the source, decoder stack (causal self-attention + cross-attention) over the target.

    Parameters: ``tok_embed`` (source embedding; with ``tie_embeddings`` also the
    target embedding and the output head), ``tgt_tok_embed`` and ``lm_head``
    (untied only), ``src_pos_embed`` / ``tgt_pos_embed`` (learned only),
    ``layers.{i}.*`` and ``norm`` (encoder), ``decoder_layers.{i}.*`` and
    ``decoder_norm`` (decoder); the norms exist in pre-norm models only.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_dec = cfg.n_decoder_layers if cfg.n_decoder_layers is not None else cfg.n_layers
        self.tok_embed = token_embedding(cfg)
        self.tgt_tok_embed = None if cfg.tie_embeddings else token_embedding(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.src_pos_embed = additive_positions(cfg)
        self.tgt_pos_embed = additive_positions(cfg)
        self.rope = rotary(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        kw = layer_kwargs(cfg)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, **kw) for _ in range(cfg.n_layers)
        )
        self.norm = final_norm(cfg)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cross=True, **kw) for _ in range(n_dec)
        )
        self.decoder_norm = final_norm(cfg)
        init_weights(self, cfg.init_std)
        scale_residual_projections(self.layers, cfg.init_std, cfg.n_layers)
        scale_residual_projections(self.decoder_layers, cfg.init_std, n_dec)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for src (B, S) and tgt (B, T).

        Masks are bool (True = real token). Right-padded targets need no
        `tgt_mask` (causality already hides the padding) and leaving it None
        keeps SDPA on its fused causal kernel.
        """
        memory = self.encode(src, src_mask)
        return self.decode(tgt, memory, src_mask, tgt_mask=tgt_mask)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S), src_mask (B, S) or None -> memory (B, S, D)."""
        check_length(src.shape[1], self.cfg.max_len, "source")
        positions = positions_for(src.shape[1], 0, src.device, src_mask)
        x, rope = embed_inputs(src, positions, self.tok_embed, self.src_pos_embed, self.rope, self.drop)
        attn_mask = key_padding_mask(src_mask)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, rope=rope)
        return self.norm(x) if self.norm is not None else x

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding with `decode(..., cache=...)`."""
        return KVCache(len(self.decoder_layers))

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None,
        src_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target logits (B, T, V) given the encoder memory.

        Args:
            tgt: (B, T) target ids (with a cache: only the new tokens).
            memory: (B, S, D) from `encode`; may be None once `cache` holds the cross K/V.
            src_mask: (B, S) bool source mask; stored in the cache on first use.
            cache: `KVCache` from `new_cache()`, updated in place: self-attention K/V
                are appended, cross-attention K/V are computed once from `memory`.
            tgt_mask: (B, T) bool target mask (left padding only; see `forward`).
        """
        h = self.decode_hidden(tgt, memory, src_mask, cache, tgt_mask)
        if self.lm_head is not None:
            return self.lm_head(h)
        return self.tok_embed.attend(h)  # (B, T, V), tied output head

    def decode_hidden(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None,
        src_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final decoder hidden states (B, T, D); arguments as in `decode`."""
        t, past = tgt.shape[1], cache.length if cache is not None else 0
        check_length(past + t, self.cfg.max_len, "target")
        if cache is not None:
            if not cache.has_cross:
                cache.cross_mask = src_mask
            src_mask = cache.cross_mask
        key_mask = extend_key_mask(cache, tgt_mask, tgt)
        positions = positions_for(t, past, tgt.device, key_mask)
        attn_mask, is_causal = self_attention_mask(t, past, tgt.device, key_mask)
        embed = self.tok_embed if self.tgt_tok_embed is None else self.tgt_tok_embed
        x, rope = embed_inputs(tgt, positions, embed, self.tgt_pos_embed, self.rope, self.drop)
        memory_mask = cache.cross_attention_mask() if cache is not None else key_padding_mask(src_mask)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(
                x, attn_mask=attn_mask, is_causal=is_causal, rope=rope,
                cache=cache.self_kv[i] if cache is not None else None,
                memory=memory, memory_mask=memory_mask,
                cross_cache=cache.cross_kv[i] if cache is not None else None,
            )
        if cache is not None:
            cache.length += t
        return self.decoder_norm(x) if self.decoder_norm is not None else x

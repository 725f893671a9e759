"""Bidirectional encoder (BERT style) with a head chosen by ``cfg.head``: mlm, tagging or relation."""

from __future__ import annotations

import torch
from torch import nn

from trainformer.config import ModelConfig
from trainformer.models.common import (
    additive_positions,
    check_length,
    embed_inputs,
    final_norm,
    layer_kwargs,
    rotary,
    token_embedding,
)
from trainformer.models.heads import MLMHead, RelationHead, TaggingHead
from trainformer.nn import CharCNN, EncoderLayer, init_weights, scale_residual_projections
from trainformer.nn.masks import key_padding_mask, positions_for
from trainformer.nn.norm import make_norm

ENCODER_HEADS = ("mlm", "tagging", "relation")


class Encoder(nn.Module):
    """Token embedding -> positions -> `EncoderLayer`s -> norm -> head.

    Parameters: ``tok_embed``, ``pos_embed`` (learned only), ``char_cnn.*``
    (``model.char_cnn`` only), ``embed_norm`` (``model.embed_norm`` only), ``layers.{i}.*``, ``norm`` (pre-norm only),
    ``head.*`` (see `trainformer.models.heads`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = token_embedding(cfg)
        self.pos_embed = additive_positions(cfg)
        self.rope = rotary(cfg)
        self.char_cnn = CharCNN(cfg.d_model, cfg.char_cnn) if cfg.char_cnn else None
        self.embed_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, **layer_kwargs(cfg)) for _ in range(cfg.n_layers)
        )
        self.norm = final_norm(cfg)
        heads = {"mlm": MLMHead, "tagging": TaggingHead, "relation": RelationHead}
        self.head = heads[cfg.head](cfg)
        init_weights(self, cfg.init_std)
        scale_residual_projections(self.layers, cfg.init_std, cfg.n_layers)

    def hidden(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, chars: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (B, S), mask (B, S) bool (True = real token) or None, chars (B, S, W) the bytes of
        each token's word (read only with ``model.char_cnn``) -> hidden states (B, S, D)."""
        check_length(ids.shape[1], self.cfg.max_len)
        positions = positions_for(ids.shape[1], 0, ids.device, mask)
        extra = None
        if self.char_cnn is not None:
            if chars is None:
                raise ValueError("this encoder has a character CNN (model.char_cnn): pass chars (B, S, W)")
            extra = self.char_cnn(chars)  # (B, S, D)
        x, rope = embed_inputs(ids, positions, self.tok_embed, self.pos_embed, self.rope, self.drop, extra,
                               self.embed_norm)
        attn_mask = key_padding_mask(mask)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, rope=rope)
        return self.norm(x) if self.norm is not None else x

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        e1_pos: torch.Tensor | None = None,
        e2_pos: torch.Tensor | None = None,
        chars: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head output: MLM logits (B, S, V), tag logits (B, S, L) or relation logits (B, L).

        Args:
            ids: (B, S) token ids; mask: (B, S) bool, True = real token, or None.
            e1_pos, e2_pos: (B,) indices of the two entity-start markers (relation head only).
            chars: (B, S, W) word bytes per token (`trainformer.data.chars`; ``model.char_cnn`` only).
        """
        h = self.hidden(ids, mask, chars)
        if isinstance(self.head, MLMHead):
            return self.head(h, self.tok_embed.weight)
        if isinstance(self.head, RelationHead):
            if e1_pos is None or e2_pos is None:
                raise ValueError("the relation head needs e1_pos and e2_pos (B,) marker indices")
            return self.head(h, e1_pos, e2_pos)
        return self.head(h)

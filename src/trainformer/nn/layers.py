"""Transformer layers: `EncoderLayer` and `DecoderLayer` (causal self-attention, optional cross-attention).

Every sub-layer is wrapped in a residual connection with dropout on the
sub-layer's output. Pre-norm (``norm_first=True``, default) computes
``x + drop(f(norm(x)))`` and needs a final norm after the stack; post-norm
(the 2017 layout) computes ``norm(x + drop(f(x)))`` and needs none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainformer.nn.attention import MultiHeadAttention, Rope
from trainformer.nn.cache import LayerKV
from trainformer.nn.feedforward import FeedForward
from trainformer.nn.norm import make_norm


class _Block(nn.Module):
    """Residual wiring shared by both layer kinds."""

    def __init__(self, dropout: float, norm_first: bool):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.norm_first = norm_first

    def residual(self, x: torch.Tensor, norm: nn.Module, f: Callable[[torch.Tensor], torch.Tensor]):
        if self.norm_first:
            return x + dropout(self.drop, f(norm(x)))
        return norm(x + dropout(self.drop, f(x)))


def dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`drop(x)`, skipped where it is the identity (eval mode or p = 0): a decoding step
    would otherwise pay a module call per sub-layer for nothing."""
    return drop(x) if drop.training and drop.p > 0 else x


class EncoderLayer(_Block):
    """Bidirectional self-attention + feed-forward.

    Parameters: ``attn_norm``, ``self_attn`` (qkv, out), ``ffn_norm``, ``ffn`` (up, down).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm: str = "layernorm",
        norm_first: bool = True,
        norm_eps: float = 1e-5,
        bias: bool = True,
    ):
        super().__init__(dropout, norm_first)
        self.attn_norm = make_norm(norm, d_model, norm_eps, bias)
        self.self_attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias)
        self.ffn_norm = make_norm(norm, d_model, norm_eps, bias)
        self.ffn = FeedForward(d_model, d_ff, activation, bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """x (B, S, D), attn_mask bool (B, 1, 1, S) or None -> (B, S, D)."""
        x = self.residual(x, self.attn_norm, lambda h: self.self_attn(h, attn_mask=attn_mask, rope=rope))
        return self.residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(_Block):
    """Causal self-attention, cross-attention to an encoder memory (if ``cross``), feed-forward.

    Parameters: ``attn_norm``, ``self_attn`` (qkv, out), [``cross_norm``,
    ``cross_attn`` (q, kv, out)], ``ffn_norm``, ``ffn`` (up, down).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        cross: bool = False,
        n_kv_heads: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        norm: str = "layernorm",
        norm_first: bool = True,
        norm_eps: float = 1e-5,
        bias: bool = True,
    ):
        super().__init__(dropout, norm_first)
        self.attn_norm = make_norm(norm, d_model, norm_eps, bias)
        self.self_attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias)
        if cross:
            self.cross_norm = make_norm(norm, d_model, norm_eps, bias)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias, cross=True)
        self.ffn_norm = make_norm(norm, d_model, norm_eps, bias)
        self.ffn = FeedForward(d_model, d_ff, activation, bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: Rope | None = None,
        cache: LayerKV | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cross_cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        Args:
            attn_mask / is_causal: self-attention mask (see `trainformer.nn.masks.self_attention_mask`).
            rope: (cos, sin) for the self-attention; cache: this layer's self-attention K/V.
            memory: (B, S, D) encoder output; memory_mask: bool (B, 1, 1, S) or None;
            cross_cache: this layer's cross-attention K/V (filled on first use).
        """
        x = self.residual(
            x, self.attn_norm,
            lambda h: self.self_attn(h, attn_mask=attn_mask, is_causal=is_causal, rope=rope, cache=cache),
        )
        if hasattr(self, "cross_attn"):
            x = self.residual(
                x, self.cross_norm,
                lambda h: self.cross_attn(h, memory, attn_mask=memory_mask, cache=cross_cache),
            )
        return self.residual(x, self.ffn_norm, self.ffn)

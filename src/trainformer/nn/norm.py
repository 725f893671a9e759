"""Normalisation layers: PyTorch's own LayerNorm and RMSNorm (no hand-made variants)."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, d_model: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``"layernorm"`` (with a bias unless ``bias=False``) or ``"rmsnorm"`` (Zhang & Sennrich 2019)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm: expected 'layernorm' or 'rmsnorm', got {kind!r}")

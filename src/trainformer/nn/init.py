"""Weight initialisation shared by every family.

normal(0, std) for linear and embedding weights, zeros for biases, ones for
norm weights; the projections that write into the residual stream
(attention ``out`` and feed-forward ``down``) get std / sqrt(2 * n_layers)
so the residual variance does not grow with depth (GPT-2, Radford et al.
2019, section 2.3).
"""

from __future__ import annotations

import math

from torch import nn

from trainformer.nn.attention import MultiHeadAttention
from trainformer.nn.feedforward import FeedForward


def init_weights(module: nn.Module, std: float) -> None:
    """normal(0, std) for every Linear / Embedding weight in `module`, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def scale_residual_projections(layers: nn.Module, std: float, n_layers: int) -> None:
    """Re-draw attention ``out`` and feed-forward ``down`` weights of a stack with std / sqrt(2 n_layers)."""
    residual_std = std / math.sqrt(2 * max(n_layers, 1))
    for m in layers.modules():
        if isinstance(m, MultiHeadAttention):
            nn.init.normal_(m.out.weight, mean=0.0, std=residual_std)
        elif isinstance(m, FeedForward):
            nn.init.normal_(m.down.weight, mean=0.0, std=residual_std)

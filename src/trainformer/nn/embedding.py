"""Token embeddings and the three position encodings.

Positions are passed explicitly as a tensor of indices, (T,) shared by the
batch or (B, T) per row, so padding-aware positions (left-padded prompts),
per-document positions (packed rows) and KV-cache offsets all use one path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.nn.cpu_head import FastHead


class TokenEmbedding(nn.Embedding):
    """`nn.Embedding` whose output is multiplied by `scale` (sqrt(d_model) in Vaswani et al.);
    its weight is also the tied output projection (`attend`)."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True):
        super().__init__(vocab_size, d_model)
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.fast_head = FastHead()  # CPU decoding's route to the same logits (nn/cpu_head.py)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D)."""
        x = super().forward(ids)
        return x * self.scale if self.scale != 1.0 else x

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """The tied output projection: h (..., D) -> logits (..., V), one per embedding row.

        Outside training, on the CPU, the same product comes from `self.fast_head`, which is
        faster there (`trainformer.nn.cpu_head`; ``fast_head.max_rows = 0`` turns it off).
        """
        if not self.fast_head.applies(h, self.weight):
            return F.linear(h, self.weight)  # (..., V)
        return self.fast_head(h, self.weight)


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same); (max_len, D) float32."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = pos * inv_freq  # (L, D/2)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal encodings (Vaswani et al. 2017, section 3.5), kept as a buffer.

    The buffer is not persistent: it is recomputed at construction, so it is
    not a checkpoint key and cannot drift from the formula.
    """

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("pe", sinusoid_table(max_len, d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (T,) or (B, T) -> encodings (T, D) or (B, T, D), to be added."""
        return self.pe[positions]


class LearnedPositions(nn.Embedding):
    """A learned table of `max_len` position vectors (BERT, GPT-2)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__(max_len, d_model)
        self.max_len = max_len


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as in GPT-NeoX / Llama.

    Dimension i is paired with i + Dh/2 and the pair is rotated by
    pos * theta^(-2i/Dh). The model computes (cos, sin) once per forward and
    every attention layer applies them to q and k (`apply_rotary`).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.max_len = max_len
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq  # (L, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, Dh)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> (cos, sin), each broadcastable to (B, H, T, Dh)."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, Dh) or (B, T, Dh)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, Dh) by the angles in cos/sin (broadcastable to x); keeps x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast: no silent upcast
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin

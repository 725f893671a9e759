"""Position-wise feed-forward block: up-projection, activation, down-projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.nn import native

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


def _native_gelu(h: torch.Tensor) -> bool:
    """Outside autograd on the CPU in fp32 (decoding, evaluation): the C kernel's GELU, in place
    on the fresh up-projection (`trainformer.nn.native`, where it is built)."""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and h.is_contiguous()
            and native.outside_autograd(h) and native.pays(h.numel()))


class FeedForward(nn.Module):
    """``down(act(up(x)))``; SwiGLU (Shazeer 2020) is ``down(silu(gate) * value)``.

    ``gelu_tanh`` is GELU's tanh approximation, the activation GPT-2 was trained with
    (so imported GPT-2 checkpoints compute what they computed there).

    Parameters: ``up`` (D -> F, or D -> 2F for SwiGLU with rows [gate; value],
    fused so the two projections are one GEMM) and ``down`` (F -> D).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.up = nn.Linear(d_model, width, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        h = self.up(x)  # (B, T, F) or (B, T, 2F)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.activation == "gelu":
            h = native.gelu_(h) if _native_gelu(h) else F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.down(h)

"""Transformations applied to a built model from outside: activation checkpointing, compile.

Models hold no training code (ARCHITECTURE.md); they only expose their
repeated layers as `model.layers` / `model.decoder_layers`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainformer.training.distributed import transformer_layers


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Non-reentrant checkpointing supports keyword arguments, inputs that do
        # not require grad and torch.compile (PyTorch recommends it over reentrant).
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each Transformer layer's activations in the backward pass.

    Saves the memory of every layer's intermediate activations for about one
    extra forward pass of compute. The layer's `forward` is replaced on the
    instance, so parameter names (checkpoint keys) do not change. Returns the
    number of layers wrapped (0 when the model exposes none).
    """
    layers = transformer_layers(model)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)
    return len(layers)


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile` with dynamic shapes: bucketed batches vary in length and size,
    and a static compile would recompile for every new shape."""
    return torch.compile(model, dynamic=True)

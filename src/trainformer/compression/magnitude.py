"""Unstructured global magnitude pruning (Han et al. 2015; Gale et al. 2019).

The smallest-magnitude weights of all attention and feed-forward Linear
layers, ranked together, are set to zero. Embeddings, the output head and
task heads stay dense (their rows are per-token / per-label, and the tied
embedding is also the output projection).

Be honest about what this buys: the model keeps its dense shapes and is
saved dense with zeros, so the file is not smaller and dense kernels do not
run faster. It measures how many weights the model can lose; real speed and
size gains come from structured pruning (`structured.py`) or int8.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trainformer.models.shapes import attention_modules, ffn_modules

NOTE = ("unstructured zeros: dense kernels are not faster and the file is not smaller "
        "(the model keeps its dense shapes and is saved dense)")


def prunable_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, weight) of every Linear weight inside attention and feed-forward modules."""
    modules = [*attention_modules(model), *ffn_modules(model)]
    for prefix, module in modules:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                yield f"{prefix}.{name}.weight", sub.weight


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, Any]:
    """Zero the fraction `sparsity` of smallest |w| over all `prunable_weights`, in place.

    One global threshold (the k-th smallest magnitude, k = round(sparsity x n));
    weights tied at the threshold are zeroed too, so the result can be a hair
    sparser. Sparsity 0 changes nothing.

    Args:
        model: any family's model.
        sparsity: fraction in [0, 1) of the prunable weights to zero.
    Returns:
        a summary: requested and actual sparsity, weights counted.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = [w for _, w in prunable_weights(model)]
    n = sum(w.numel() for w in weights)
    k = round(sparsity * n)
    if k > 0:
        magnitudes = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights])
        threshold = magnitudes.kthvalue(k).values
        for w in weights:
            w.masked_fill_(w.abs().float() <= threshold.to(w.device), 0.0)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"sparsity": sparsity, "actual_sparsity": zeros / max(n, 1), "prunable_weights": n,
            "note": NOTE}


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per prunable weight name, a bool mask of its non-zero entries (what fine-tuning may change)."""
    return {name: w.detach() != 0 for name, w in prunable_weights(model)}


def keep_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[Any]:
    """Mask the gradients of pruned weights so training leaves them at zero; returns hook handles.

    With a zero gradient AdamW's moments stay zero, so its update is zero, and
    decoupled weight decay of a zero weight is zero: the weights stay exactly 0.
    """
    handles = []
    for name, w in prunable_weights(model):
        mask = masks[name]
        handles.append(w.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
    return handles


@torch.no_grad()
def reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries again (after training, against any numerical drift)."""
    for name, w in prunable_weights(model):
        w.mul_(masks[name].to(w.device, w.dtype))

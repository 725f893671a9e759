"""AdamW with decoupled weight decay on matrices only, and gradient clipping."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from trainformer.config import OptimConfig

# Substrings of parameter names that never get weight decay (a CRF's tag-path scores are
# log-potentials: decay would pull them toward "every path alike").
NO_DECAY_NAMES = ("embed", "norm", "crf")


def _decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on weight matrices only: not on biases, norm gains or embeddings.

    Decaying norms and biases only pulls them toward 0 without regularising
    (the GPT-2/nanoGPT practice); embeddings are excluded since rare tokens get
    few gradient updates and would be decayed to nothing.
    """
    lowered = name.lower()
    return param.ndim >= 2 and not any(s in lowered for s in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: with and without weight decay (trainable parameters only)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # tied parameters appear once
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, fused when `cfg.fused` and supported.

    The fused kernel does the whole update in one pass per device (PyTorch >= 2.4
    on CPU and CUDA); if a parameter's device/dtype has no fused kernel we warn
    and fall back to the foreach implementation.
    """
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"fused AdamW unavailable ({e}); using the foreach version", stacklevel=2)
    return torch.optim.AdamW(groups, **kwargs)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total L2 norm of the gradients (a 0-dim tensor, not synced); clip to `max_norm` if > 0.

    Works for plain, DDP and FSDP2 (DTensor) parameters: a sharded norm is
    reduced across ranks with `full_tensor()` as torchtitan does.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor from FSDP2
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm

"""Structured pruning: physically remove attention heads and feed-forward neurons.

Importance is a data-free weight score, an upper bound on how much a unit
can write into the residual stream:

- a key/value group of heads: ||W_v rows of the group||_F * ||W_out columns of its query heads||_F
  (the head's output is W_out,h softmax(.) V_h, and ||softmax(.)|| <= 1 row-wise);
- a feed-forward neuron i: ||W_up row i||_2 * ||W_down column i||_2 (SwiGLU: the gate
  and value rows together).

Scores are normalised per module (divided by their L2 norm, as Michel et al.
2019, "Are Sixteen Heads Really Better than One?", do for head importance)
and ranked globally, so layers may keep different numbers of heads / neurons;
every module keeps at least one. The removed units' rows and columns are cut
out of the Linear modules, so the result is a smaller dense model whose
per-layer sizes are recorded by `trainformer.models.shapes.model_shapes`.

With calibration data (``trainformer prune --calibrate N``: N training
batches of the model's own task, forward passes only), a unit is scored by
what it actually writes into the residual stream on that data instead:

- a key/value group: the mean over tokens of ||sum over its heads h of o_h W_out,h^T||_2,
  o_h being head h's attention output;
- a neuron i: mean |a_i| x ||W_down column i||_2, a_i being its activation.

A neuron or head that rarely fires on real text then goes first, whatever its
weight norms say (the activation-aware scores of Wanda / FLAP, for whole units).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainformer.models.shapes import (
    attention_modules,
    ffn_modules,
    ffn_width,
    group_size,
    shrink_attention,
    shrink_ffn,
)
from trainformer.nn.attention import MultiHeadAttention
from trainformer.nn.feedforward import FeedForward

SCORE = "weight norm: ||W_v group|| x ||W_out columns|| per head group, ||W_up row|| x ||W_down column|| per neuron"


@torch.no_grad()
def head_group_scores(attn: MultiHeadAttention) -> torch.Tensor:
    """Importance of each key/value group of `attn`: (n_kv_heads,) float32."""
    dh, kv, g = attn.head_dim, attn.n_kv_heads, group_size(attn)
    if attn.cross:
        v = attn.kv.weight[kv * dh:]  # (KV Dh, D)
    else:
        v = attn.qkv.weight[(attn.n_heads + kv) * dh:]  # (KV Dh, D)
    v_norm = v.float().reshape(kv, dh, -1).pow(2).sum(dim=(1, 2)).sqrt()  # (KV,)
    out = attn.out.weight.float().reshape(-1, kv, g * dh)  # (D, KV, g Dh): columns grouped by kv head
    out_norm = out.pow(2).sum(dim=(0, 2)).sqrt()  # (KV,)
    return v_norm * out_norm


@torch.no_grad()
def neuron_scores(ffn: FeedForward) -> torch.Tensor:
    """Importance of each hidden neuron of `ffn`: (d_ff,) float32."""
    width = ffn_width(ffn)
    up = ffn.up.weight.float()  # (F, D) or (2F, D) for SwiGLU
    up_sq = up.pow(2).sum(dim=1)
    if ffn.activation == "swiglu":
        up_sq = up_sq[:width] + up_sq[width:]  # gate and value rows of neuron i
    down_norm = ffn.down.weight.float().pow(2).sum(dim=0).sqrt()  # (F,)
    return up_sq.sqrt() * down_norm


CALIBRATED_SCORE = ("activations on calibration batches: mean ||head-group output x W_out|| per head group, "
                    "mean |activation| x ||W_down column|| per neuron")


@torch.no_grad()
def activation_scores(model: nn.Module, run_batches: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Per attention / feed-forward module path, (n_units,) scores from the activations seen
    while `run_batches()` runs forward passes of `model` (see the module docstring)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, per_token: torch.Tensor) -> None:  # per_token: (N, units)
        sums[name] = sums.get(name, 0) + per_token.float().sum(dim=0)
        counts[name] = counts.get(name, 0) + per_token.shape[0]

    def on_attention(name: str, attn: MultiHeadAttention):
        kv, width = attn.n_kv_heads, group_size(attn) * attn.head_dim
        w_out = attn.out.weight.float().reshape(-1, kv, width)  # (D, KV, g Dh)

        def hook(module, inputs):
            o = inputs[0].reshape(-1, kv, width).float()  # (N, KV, g Dh): heads side by side
            written = torch.einsum("nkc,dkc->nkd", o, w_out)  # (N, KV, D) per group, into the residual
            add(name, written.norm(dim=-1))
        return attn.out.register_forward_pre_hook(hook)

    def on_ffn(name: str, ffn: FeedForward):
        def hook(module, inputs):
            add(name, inputs[0].reshape(-1, inputs[0].shape[-1]).abs())  # (N, F)
        return ffn.down.register_forward_pre_hook(hook)

    handles = [on_attention(n, a) for n, a in attention_modules(model)]
    handles += [on_ffn(n, f) for n, f in ffn_modules(model)]
    try:
        run_batches()
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise ValueError("calibration ran no forward pass through the attention / feed-forward layers")
    scores = {n: sums[n] / counts[n] for n in sums}
    for name, ffn in ffn_modules(model):
        scores[name] = scores[name] * ffn.down.weight.float().pow(2).sum(dim=0).sqrt()
    return scores


def select_units(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Which units to keep: remove round(sparsity x all units) of the lowest normalised scores.

    Args:
        scores: per module path, a (n_units,) importance vector.
        sparsity: fraction of all units to remove, in [0, 1).
    Returns:
        per module path, the sorted indices of the kept units (at least one each).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(scores)
    normalised = [scores[n] / scores[n].norm().clamp_min(1e-12) for n in names]
    total = sum(s.numel() for s in normalised)
    to_remove = round(sparsity * total)
    flat = torch.cat(normalised)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(normalised)])
    local = torch.cat([torch.arange(s.numel()) for s in normalised])
    left = [s.numel() for s in normalised]
    removed: list[set[int]] = [set() for _ in names]
    # stable sort: equal scores go in model order, so the choice is deterministic
    for j in torch.argsort(flat, stable=True).tolist():
        if to_remove == 0:
            break
        i = int(owner[j])
        if left[i] > 1:
            removed[i].add(int(local[j]))
            left[i] -= 1
            to_remove -= 1
    return {
        n: torch.tensor([u for u in range(s.numel()) if u not in removed[i]], dtype=torch.long)
        for i, (n, s) in enumerate(zip(names, normalised))
    }


def structured_prune(
    model: nn.Module,
    sparsity: float,
    heads: bool = True,
    ffn: bool = True,
    calibrate: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Remove a fraction `sparsity` of the attention head groups and/or feed-forward neurons, in place.

    Heads and neurons are ranked separately (each loses `sparsity` of its units).
    Sparsity 0 leaves the model untouched.

    Args:
        model: any family's model (its `MultiHeadAttention` / `FeedForward` modules are pruned).
        sparsity: fraction in [0, 1) of head groups and of neurons to remove.
        heads / ffn: which kinds of unit to prune.
        calibrate: runs forward passes of `model` on calibration data; given, units
            are scored by their activations there (`activation_scores`).
    Returns:
        a summary: heads and neurons before / after, and the score used.
    """
    report: dict[str, Any] = {"score": SCORE if calibrate is None else CALIBRATED_SCORE}
    measured = activation_scores(model, calibrate) if calibrate is not None and sparsity > 0 else None
    if heads:
        attns = dict(attention_modules(model))
        before = sum(a.n_heads for a in attns.values())
        scores = {n: measured[n] if measured else head_group_scores(a) for n, a in attns.items()}
        keep = select_units(scores, sparsity)
        for name, idx in keep.items():
            if idx.numel() < attns[name].n_kv_heads:
                shrink_attention(attns[name], idx)
        report["heads"] = {"before": before, "after": sum(a.n_heads for a in attns.values())}
    if ffn:
        blocks = dict(ffn_modules(model))
        before = sum(ffn_width(f) for f in blocks.values())
        keep = select_units({n: measured[n] if measured else neuron_scores(f) for n, f in blocks.items()},
                            sparsity)
        for name, idx in keep.items():
            if idx.numel() < ffn_width(blocks[name]):
                shrink_ffn(blocks[name], idx)
        report["neurons"] = {"before": before, "after": sum(ffn_width(f) for f in blocks.values())}
    return report

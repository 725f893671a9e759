"""Per-layer sizes: attention heads and feed-forward widths that differ from layer to layer.

`ModelConfig` has one global ``n_heads`` and ``d_ff``; after structured
pruning (`trainformer.compression.structured`) every attention module and
every feed-forward block may have its own size. Those sizes are part of the
model's config, ``model.layer_sizes`` in config.json:

    {"layers.0.self_attn.heads": 3, "layers.0.self_attn.kv_heads": 3,
     "layers.0.ffn.d_ff": 700, ...}

keyed by the module's own path (its parameter-name prefix). `build_model`
builds the full-size model and shrinks its Linear modules to those sizes
(`apply_layer_sizes`), so the state dict of a pruned model loads as any other.

The unit of attention pruning is a key/value group: one K/V head and the
``n_heads / n_kv_heads`` query heads that share it (plain multi-head
attention: one head). Keeping whole groups keeps ``n_heads`` a multiple of
``n_kv_heads``, which SDPA's grouped-query path needs; the head dimension
never changes, so rotary tables and the KV cache work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from trainformer.errors import ConfigError
from trainformer.nn.attention import MultiHeadAttention
from trainformer.nn.feedforward import FeedForward


def attention_modules(model: nn.Module) -> Iterator[tuple[str, MultiHeadAttention]]:
    """(path, module) of every attention module (self and cross), in model order."""
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            yield name, m


def ffn_modules(model: nn.Module) -> Iterator[tuple[str, FeedForward]]:
    """(path, module) of every feed-forward block, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, FeedForward):
            yield name, m


def group_size(attn: MultiHeadAttention) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return attn.n_heads // attn.n_kv_heads


def ffn_width(ffn: FeedForward) -> int:
    """Hidden neurons of a feed-forward block (its d_ff)."""
    return ffn.down.in_features


# ----------------------------------------------------------------------------
# Shrinking Linear modules
# ----------------------------------------------------------------------------


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear holding copies of `weight` (out, in) and `bias`, on the old one's device and dtype."""
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A Linear with only the output features `rows` (their weight rows and bias entries)."""
    rows = rows.to(linear.weight.device)
    bias = linear.bias.detach()[rows] if linear.bias is not None else None
    return _new_linear(linear, linear.weight.detach()[rows], bias)


def keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """A Linear with only the input features `cols`; its bias (an output quantity) is unchanged."""
    cols = cols.to(linear.weight.device)
    bias = linear.bias.detach() if linear.bias is not None else None
    return _new_linear(linear, linear.weight.detach()[:, cols], bias)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a (heads * Dh)-row projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (len(heads) * Dh,)


def shrink_attention(attn: MultiHeadAttention, keep_groups: torch.Tensor) -> None:
    """Keep only the key/value groups `keep_groups` (sorted indices) of `attn`, in place.

    Self-attention ``qkv`` rows are [q (H Dh); k (KV Dh); v (KV Dh)]; cross-attention
    has ``q`` (H Dh) and ``kv`` rows [k (KV Dh); v (KV Dh)]; ``out`` takes the q-head
    columns. Query head h belongs to group h // (H / KV).
    """
    keep_groups = keep_groups.long().sort().values
    if keep_groups.numel() < 1:
        raise ValueError("an attention module must keep at least one head")
    dh, g, kv = attn.head_dim, group_size(attn), attn.n_kv_heads
    q_heads = (keep_groups[:, None] * g + torch.arange(g)).flatten()  # (K g,)
    q_rows, kv_rows = _head_rows(q_heads, dh), _head_rows(keep_groups, dh)
    if attn.cross:
        attn.q = keep_rows(attn.q, q_rows)
        attn.kv = keep_rows(attn.kv, torch.cat([kv_rows, kv * dh + kv_rows]))
    else:
        q_dim, kv_dim = attn.n_heads * dh, kv * dh
        attn.qkv = keep_rows(attn.qkv, torch.cat([q_rows, q_dim + kv_rows, q_dim + kv_dim + kv_rows]))
    attn.out = keep_cols(attn.out, q_rows)
    attn.n_heads, attn.n_kv_heads = int(q_heads.numel()), int(keep_groups.numel())


def shrink_ffn(ffn: FeedForward, keep: torch.Tensor) -> None:
    """Keep only the hidden neurons `keep` (sorted indices) of `ffn`, in place.

    ``up`` rows are the neurons (SwiGLU: [gate (F); value (F)], so neuron i is
    rows i and F + i); ``down`` takes the neuron columns.
    """
    keep = keep.long().sort().values
    if keep.numel() < 1:
        raise ValueError("a feed-forward block must keep at least one neuron")
    rows = keep
    if ffn.activation == "swiglu":
        rows = torch.cat([keep, ffn_width(ffn) + keep])
    ffn.up = keep_rows(ffn.up, rows)
    ffn.down = keep_cols(ffn.down, keep)


# ----------------------------------------------------------------------------
# Sizes in model.layer_sizes
# ----------------------------------------------------------------------------


def model_shapes(model: nn.Module) -> dict[str, int]:
    """Every attention module's heads / kv_heads and every feed-forward block's d_ff, by path."""
    shapes: dict[str, int] = {}
    for name, attn in attention_modules(model):
        shapes[f"{name}.heads"] = attn.n_heads
        shapes[f"{name}.kv_heads"] = attn.n_kv_heads
    for name, ffn in ffn_modules(model):
        shapes[f"{name}.d_ff"] = ffn_width(ffn)
    return shapes


def _bad(key: str, what: str) -> ConfigError:
    return ConfigError(f"model.layer_sizes[{key!r}]: {what}")


def _int_entry(shapes: Mapping[str, Any], key: str) -> int:
    value = shapes.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, f"expected an integer >= 1, got {value!r}")
    return value


def _module(model: nn.Module, path: str, kind: type, key: str) -> Any:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, kind):
        raise _bad(key, f"the model has no {kind.__name__} at {path!r}")
    return module


def _apply_attention(model: nn.Module, path: str, shapes: Mapping[str, Any]) -> None:
    attn = _module(model, path, MultiHeadAttention, f"{path}.heads")
    heads, kv = _int_entry(shapes, f"{path}.heads"), _int_entry(shapes, f"{path}.kv_heads")
    g = group_size(attn)
    if kv > attn.n_kv_heads or heads != kv * g:
        raise _bad(path, f"{heads} heads / {kv} kv_heads do not fit a module of {attn.n_heads} heads / "
                         f"{attn.n_kv_heads} kv_heads (heads must be {g} x kv_heads)")
    if kv < attn.n_kv_heads:
        shrink_attention(attn, torch.arange(kv))


def _apply_ffn(model: nn.Module, path: str, shapes: Mapping[str, Any]) -> None:
    ffn = _module(model, path, FeedForward, f"{path}.d_ff")
    width = _int_entry(shapes, f"{path}.d_ff")
    if width > ffn_width(ffn):
        raise _bad(f"{path}.d_ff", f"{width} is larger than model.d_ff={ffn_width(ffn)}")
    if width < ffn_width(ffn):
        shrink_ffn(ffn, torch.arange(width))


def apply_layer_sizes(model: nn.Module, sizes: Mapping[str, Any]) -> nn.Module:
    """Shrink a freshly built model to the per-layer `sizes` (``model.layer_sizes``), in place.

    `build_model` calls it; the kept rows hold arbitrary values until a state
    dict overwrites them. Empty `sizes` leave the model unchanged.

    Args:
        model: a model built from the same config at full size.
        sizes: PATH.heads / PATH.kv_heads / PATH.d_ff -> size (as `model_shapes` gives them).
    Returns:
        the same model.
    """
    for key in sizes:
        if "." not in key or key.rsplit(".", 1)[1] not in ("heads", "kv_heads", "d_ff"):
            raise _bad(key, "expected PATH.heads, PATH.kv_heads or PATH.d_ff")
    ffn_paths = {k.rsplit(".", 1)[0] for k in sizes if k.endswith(".d_ff")}
    attn_paths = {k.rsplit(".", 1)[0] for k in sizes if not k.endswith(".d_ff")}
    for path in sorted(ffn_paths):
        _apply_ffn(model, path, sizes)
    for path in sorted(attn_paths):
        _apply_attention(model, path, sizes)
    return model

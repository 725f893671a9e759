"""The three model families and `build_model(cfg)`.

    model = build_model(cfg.model)   # EncoderDecoder, Encoder or Decoder
"""

from __future__ import annotations

from torch import nn

from trainformer.config import ModelConfig
from trainformer.errors import ConfigError
from trainformer.models.decoder import Decoder
from trainformer.models.encoder import ENCODER_HEADS, Encoder
from trainformer.models.encoder_decoder import EncoderDecoder
from trainformer.models.shapes import apply_layer_sizes

__all__ = ["Decoder", "Encoder", "EncoderDecoder", "build_model", "count_parameters"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A randomly initialised model of `cfg.family`; sizes must be known (vocab_size > 0, ...).

    Per-layer sizes (``cfg.layer_sizes``, a pruned model's) shrink the layers they name.
    """
    _check(cfg)
    family = {"encoder_decoder": EncoderDecoder, "encoder": Encoder, "decoder": Decoder}[cfg.family]
    return apply_layer_sizes(family(cfg), cfg.layer_sizes)


def _check(cfg: ModelConfig) -> None:
    if cfg.family not in ("encoder_decoder", "encoder", "decoder"):
        raise ConfigError(f"model.family: expected encoder_decoder, encoder or decoder, got {cfg.family!r}")
    if cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size: expected > 0 at build time (set it or let the task fill it)")
    if cfg.family == "encoder" and cfg.head not in ENCODER_HEADS:
        raise ConfigError(f"model.head: the encoder family needs one of {', '.join(ENCODER_HEADS)}, got {cfg.head!r}")
    if cfg.family != "encoder" and cfg.head != "lm":
        raise ConfigError(f"model.head: the {cfg.family} family has an 'lm' head, got {cfg.head!r}")
    if cfg.head in ("tagging", "relation") and cfg.num_labels <= 0:
        raise ConfigError(f"model.num_labels: expected > 0 for the {cfg.head} head at build time")
    if cfg.d_model % cfg.n_heads or cfg.n_heads % (cfg.n_kv_heads or cfg.n_heads):
        raise ConfigError(
            f"model.n_heads / n_kv_heads: d_model={cfg.d_model} must divide by n_heads={cfg.n_heads}, "
            f"and n_heads by n_kv_heads={cfg.n_kv_heads}"
        )
    if cfg.position == "rope" and (cfg.d_model // cfg.n_heads) % 2:
        raise ConfigError("model.position: rope needs an even head dimension (d_model / n_heads)")


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once).

    ``exclude_embeddings=True`` leaves out token and learned position tables
    (the "non-embedding" count of Kaplan et al. 2020).
    """
    total = 0
    for name, p in model.named_parameters():
        if exclude_embeddings and name.split(".")[0].endswith(("tok_embed", "pos_embed")):
            continue
        total += p.numel()
    return total

"""Named model sizes, one registry for every family.

A preset is a partial `ModelConfig` (plain keys); a recipe names it with
``model.preset`` and any key it sets explicitly wins. `tiny` presets are for
tests; the classic shapes reproduce published parameter counts at the
published vocabulary size (see tests/test_presets.py).
"""

from __future__ import annotations

import difflib
from typing import Any

from trainformer.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # --- encoder-decoder (translation) ---
    "tiny-encdec": dict(family="encoder_decoder", d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=128),
    "small-encdec": dict(family="encoder_decoder", d_model=256, n_heads=4, n_layers=3, d_ff=1024),
    # Vaswani et al. 2017, Table 3: base 65M, big 213M at a 37k shared vocabulary (post-norm, ReLU).
    # The architecture gives 63.1M for base (the paper's figure is rounded up) and 214.2M for big;
    # both equal MarianMTModel at the same shape less its stored sinusoid tables.
    "transformer-base": dict(
        family="encoder_decoder", d_model=512, n_heads=8, n_layers=6, d_ff=2048, max_len=1024,
        activation="relu", norm_first=False, vocab_size=37000, dropout=0.1,
    ),
    "transformer-big": dict(
        family="encoder_decoder", d_model=1024, n_heads=16, n_layers=6, d_ff=4096, max_len=1024,
        activation="relu", norm_first=False, vocab_size=37000, dropout=0.3,
    ),
    # --- encoder (BERT-style) ---
    "tiny-encoder": dict(family="encoder", d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=128, position="learned"),
    "small-encoder": dict(family="encoder", d_model=256, n_heads=4, n_layers=4, d_ff=1024, max_len=256, position="learned"),
    "medium-encoder": dict(family="encoder", d_model=384, n_heads=6, n_layers=6, d_ff=1536, max_len=256, position="learned"),
    # Devlin et al. 2019: BERT-base 110M at a 30,522 WordPiece vocabulary. With the MLM head we
    # count 109.51M = BertForMaskedLM less token-type embeddings and the embedding LayerNorm.
    "bert-base": dict(
        family="encoder", d_model=768, n_heads=12, n_layers=12, d_ff=3072, max_len=512,
        position="learned", norm_first=False, vocab_size=30522, norm_eps=1e-12, scale_embedding=False,
    ),
    # --- decoder (GPT-style) ---
    "tiny-decoder": dict(family="decoder", d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=128, position="learned"),
    "small-decoder": dict(family="decoder", d_model=384, n_heads=6, n_layers=6, d_ff=1536, max_len=256, position="learned"),
    # Radford et al. 2019: GPT-2 small 124M, medium 355M at a 50,257 vocabulary, context 1024
    # (exactly GPT2LMHeadModel's 124,439,808 and 354,823,168).
    "gpt2-small": dict(
        family="decoder", d_model=768, n_heads=12, n_layers=12, d_ff=3072, max_len=1024,
        position="learned", vocab_size=50257, scale_embedding=False,
    ),
    "gpt2-medium": dict(
        family="decoder", d_model=1024, n_heads=16, n_layers=24, d_ff=4096, max_len=1024,
        position="learned", vocab_size=50257, scale_embedding=False,
    ),
}


def get_preset(name: str) -> dict[str, Any]:
    """The keys of preset `name`; a ConfigError naming the closest preset if unknown."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.preset: unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name])

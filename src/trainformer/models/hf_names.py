"""Our parameter names -> Hugging Face names, for export (see docs/parameter-names.md).

`HF_NAMES[arch]` maps each of our checkpoint keys (``{i}`` = layer index) to
`HFName(keys, transform)`:

- several `keys`: our tensor is their concatenation along dim 0, in that
  order (our fused ``qkv`` = HF's separate query, key, value);
- ``transform="transpose"``: GPT-2's ``Conv1D`` stores weights as (in, out),
  ours are ``nn.Linear`` (out, in).

`HF_ONLY[arch]` lists HF keys with no counterpart of ours and what an
exporter writes there. `TIED[arch]` lists HF keys that are copies of our
``tok_embed.weight`` when ``tie_embeddings`` is on.

The maps describe the layouts these HF classes have: GPT-2, Pegasus and
XLM-RoBERTa-XL are pre-norm (a final ``norm``); BERT and Marian are post-norm
(``norm_first=False``), so their maps have no final ``norm``.
`trainformer.interop.hf` uses them to export and import.
"""

from __future__ import annotations

from typing import NamedTuple


class HFName(NamedTuple):
    keys: tuple[str, ...]
    transform: str = ""  # "" or "transpose"


def _one(key: str, transform: str = "") -> HFName:
    return HFName((key,), transform)


def _linear(ours: str, hf: str, transform: str = "") -> dict[str, HFName]:
    return {f"{ours}.weight": _one(f"{hf}.weight", transform), f"{ours}.bias": _one(f"{hf}.bias")}


def _norm(ours: str, hf: str) -> dict[str, HFName]:
    return {f"{ours}.weight": _one(f"{hf}.weight"), f"{ours}.bias": _one(f"{hf}.bias")}


def _fused(ours: str, hf_prefix: str, parts: tuple[str, ...], suffix: str = "") -> dict[str, HFName]:
    return {
        f"{ours}.{p}": HFName(tuple(f"{hf_prefix}.{part}{suffix}.{p}" for part in parts)) for p in ("weight", "bias")
    }


def _gpt2() -> dict[str, HFName]:
    h = "transformer.h.{i}"
    m = {"tok_embed.weight": _one("transformer.wte.weight"), "pos_embed.weight": _one("transformer.wpe.weight")}
    m |= _norm("layers.{i}.attn_norm", f"{h}.ln_1")
    m |= _linear("layers.{i}.self_attn.qkv", f"{h}.attn.c_attn", "transpose")
    m |= _linear("layers.{i}.self_attn.out", f"{h}.attn.c_proj", "transpose")
    m |= _norm("layers.{i}.ffn_norm", f"{h}.ln_2")
    m |= _linear("layers.{i}.ffn.up", f"{h}.mlp.c_fc", "transpose")
    m |= _linear("layers.{i}.ffn.down", f"{h}.mlp.c_proj", "transpose")
    m |= _norm("norm", "transformer.ln_f")
    return m


def _bert_encoder() -> dict[str, HFName]:
    """BERT's embeddings (with their norm: ``model.embed_norm``) and post-norm layers."""
    lay = "bert.encoder.layer.{i}"
    m = {
        "tok_embed.weight": _one("bert.embeddings.word_embeddings.weight"),
        "pos_embed.weight": _one("bert.embeddings.position_embeddings.weight"),
    }
    m |= _norm("embed_norm", "bert.embeddings.LayerNorm")
    m |= _fused("layers.{i}.self_attn.qkv", f"{lay}.attention.self", ("query", "key", "value"))
    m |= _linear("layers.{i}.self_attn.out", f"{lay}.attention.output.dense")
    m |= _norm("layers.{i}.attn_norm", f"{lay}.attention.output.LayerNorm")
    m |= _linear("layers.{i}.ffn.up", f"{lay}.intermediate.dense")
    m |= _linear("layers.{i}.ffn.down", f"{lay}.output.dense")
    m |= _norm("layers.{i}.ffn_norm", f"{lay}.output.LayerNorm")
    return m


def _bert() -> dict[str, HFName]:
    m = _bert_encoder()
    m |= _linear("head.dense", "cls.predictions.transform.dense")
    m |= _norm("head.norm", "cls.predictions.transform.LayerNorm")
    m["head.bias"] = HFName(("cls.predictions.bias",))
    return m


def _bert_tagging() -> dict[str, HFName]:
    return _bert_encoder() | _linear("head.proj", "classifier")


def _marian() -> dict[str, HFName]:
    enc, dec = "model.encoder.layers.{i}", "model.decoder.layers.{i}"
    m = {"tok_embed.weight": _one("model.shared.weight")}
    for ours, hf in (("layers.{i}", enc), ("decoder_layers.{i}", dec)):
        m |= _fused(f"{ours}.self_attn.qkv", f"{hf}.self_attn", ("q", "k", "v"), "_proj")
        m |= _linear(f"{ours}.self_attn.out", f"{hf}.self_attn.out_proj")
        m |= _norm(f"{ours}.attn_norm", f"{hf}.self_attn_layer_norm")
        m |= _linear(f"{ours}.ffn.up", f"{hf}.fc1")
        m |= _linear(f"{ours}.ffn.down", f"{hf}.fc2")
        m |= _norm(f"{ours}.ffn_norm", f"{hf}.final_layer_norm")
    m |= _linear("decoder_layers.{i}.cross_attn.q", f"{dec}.encoder_attn.q_proj")
    m |= _fused("decoder_layers.{i}.cross_attn.kv", f"{dec}.encoder_attn", ("k", "v"), "_proj")
    m |= _linear("decoder_layers.{i}.cross_attn.out", f"{dec}.encoder_attn.out_proj")
    m |= _norm("decoder_layers.{i}.cross_norm", f"{dec}.encoder_attn_layer_norm")
    return m


def _pegasus() -> dict[str, HFName]:
    """Marian's names plus the final norms of a pre-norm stack (Pegasus is pre-norm)."""
    m = _marian()
    m |= _norm("norm", "model.encoder.layer_norm")
    m |= _norm("decoder_norm", "model.decoder.layer_norm")
    return m


def _xlmr_xl_encoder() -> dict[str, HFName]:
    """XLM-RoBERTa-XL: a pre-norm BERT (norm inside each sub-layer, a final norm, no embedding norm).

    Its position table is offset by ``pad_token_id + 1`` rows; the exporter shifts ours.
    """
    lay = "roberta.encoder.layer.{i}"
    m = {"tok_embed.weight": _one("roberta.embeddings.word_embeddings.weight"),
         "pos_embed.weight": _one("roberta.embeddings.position_embeddings.weight")}
    m |= _norm("layers.{i}.attn_norm", f"{lay}.attention.self_attn_layer_norm")
    m |= _fused("layers.{i}.self_attn.qkv", f"{lay}.attention.self", ("query", "key", "value"))
    m |= _linear("layers.{i}.self_attn.out", f"{lay}.attention.output.dense")
    m |= _norm("layers.{i}.ffn_norm", f"{lay}.LayerNorm")
    m |= _linear("layers.{i}.ffn.up", f"{lay}.intermediate.dense")
    m |= _linear("layers.{i}.ffn.down", f"{lay}.output.dense")
    m |= _norm("norm", "roberta.encoder.LayerNorm")
    return m


def _xlmr_xl_mlm() -> dict[str, HFName]:
    m = _xlmr_xl_encoder()
    m |= _linear("head.dense", "lm_head.dense")
    m |= _norm("head.norm", "lm_head.layer_norm")
    m["head.bias"] = _one("lm_head.bias")
    m["head.decoder.weight"] = _one("lm_head.decoder.weight")  # untied heads only
    return m


def _xlmr_xl_tagging() -> dict[str, HFName]:
    return _xlmr_xl_encoder() | _linear("head.proj", "classifier")


HF_NAMES: dict[str, dict[str, HFName]] = {
    "GPT2LMHeadModel": _gpt2(),
    "BertForMaskedLM": _bert(),
    "BertForTokenClassification": _bert_tagging(),
    "MarianMTModel": _marian(),
    "PegasusForConditionalGeneration": _pegasus(),
    "XLMRobertaXLForMaskedLM": _xlmr_xl_mlm(),
    "XLMRobertaXLForTokenClassification": _xlmr_xl_tagging(),
}

TIED: dict[str, tuple[str, ...]] = {
    "GPT2LMHeadModel": ("lm_head.weight",),
    "BertForMaskedLM": ("cls.predictions.decoder.weight",),
    "BertForTokenClassification": (),
    "MarianMTModel": ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"),
    "PegasusForConditionalGeneration": (
        "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"),
    "XLMRobertaXLForMaskedLM": ("lm_head.decoder.weight",),  # unscaled embeddings only (see interop.hf)
    "XLMRobertaXLForTokenClassification": (),
}

HF_ONLY: dict[str, dict[str, str]] = {
    "GPT2LMHeadModel": {},
    "BertForMaskedLM": {
        "bert.embeddings.token_type_embeddings.weight": "zeros (we have one segment type); on import, "
        "its first row is added to every position",
        "cls.predictions.decoder.bias": "the same tensor as head.bias",
    },
    "BertForTokenClassification": {
        "bert.embeddings.token_type_embeddings.weight": "as in BertForMaskedLM",
    },
    "MarianMTModel": {
        "final_logits_bias": "zeros",
        "model.encoder.embed_positions.weight": "our sinusoid_table(max_len, d_model); Marian's own "
        "table puts sin in the first half and cos in the second",
        "model.decoder.embed_positions.weight": "as the encoder's",
    },
    "PegasusForConditionalGeneration": {
        "final_logits_bias": "zeros",
        "model.encoder.embed_positions.weight": "Pegasus's sinusoid table (sin half, cos half): the "
        "exporter permutes our interleaved residual dimensions to match it",
        "model.decoder.embed_positions.weight": "as the encoder's",
    },
    "XLMRobertaXLForMaskedLM": {
        "roberta.embeddings.token_type_embeddings.weight": "zeros (one segment type)",
        "lm_head.decoder.bias": "the same tensor as head.bias",
    },
    "XLMRobertaXLForTokenClassification": {
        "roberta.embeddings.token_type_embeddings.weight": "zeros (one segment type)",
    },
}


def expand(arch: str, n_layers: int, n_decoder_layers: int | None = None) -> dict[str, HFName]:
    """`HF_NAMES[arch]` with ``{i}`` filled in for every layer (decoder layers: `n_decoder_layers`)."""
    out: dict[str, HFName] = {}
    n_dec = n_layers if n_decoder_layers is None else n_decoder_layers
    for ours, hf in HF_NAMES[arch].items():
        if "{i}" not in ours:
            out[ours] = hf
            continue
        count = n_dec if ours.startswith("decoder_layers") else n_layers
        for i in range(count):
            out[ours.format(i=i)] = HFName(tuple(k.format(i=i) for k in hf.keys), hf.transform)
    return out

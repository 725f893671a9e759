"""Our model dirs <-> Hugging Face `transformers` directories.

Export picks, for a model's shape, the `transformers` class that computes the
same function, and writes a directory that `transformers` alone loads:

| our model | HF class |
|---|---|
| encoder-decoder, pre-norm, sinusoidal (the translation recipes) | `PegasusForConditionalGeneration` |
| encoder-decoder, post-norm, sinusoidal (`transformer-base`) | `MarianMTModel` |
| decoder, learned positions, LayerNorm (lm, chat) | `GPT2LMHeadModel` |
| encoder, pre-norm, learned positions, mlm / tagging head | `XLMRobertaXLForMaskedLM` / `...ForTokenClassification` |

Anything else is refused with one line naming the option and what exports.
The weights go through the name map of `trainformer.models.hf_names`, plus
three exact rewrites where the layouts differ only in bookkeeping:

- Sinusoids: ours interleave sin and cos (dims 2i, 2i+1); Marian and Pegasus
  put the sines in the first half and the cosines in the second. Permuting
  the residual-stream dimensions of every weight that reads or writes the
  residual stream (embeddings, norms, the inputs of q/k/v/ffn-up, the outputs
  of attention-out/ffn-down) gives a model that computes the same logits with
  HF's own table, so nothing depends on HF storing ours.
- XLM-RoBERTa-XL numbers positions from ``pad_token_id + 1``: our table is
  shifted down by that many rows.
- ``scale_embedding`` (x sqrt(d_model)) is folded into the exported token
  embedding where the HF class has no scale; a tied MLM head then gets its
  own unscaled copy (``tie_word_embeddings: false``).

Import (`trainformer.interop.hf_import`) runs the same maps backwards.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainformer.config import Config, ModelConfig, to_dict
from trainformer.data.tokenizer import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
)
from trainformer.errors import UserError
from trainformer.interop import require
from trainformer.interop.hf_card import (
    export_notes,
    generation_config,
    model_card,
    save_hf_tokenizer,
)
from trainformer.models.hf_names import TIED, expand

# ----------------------------------------------------------------------------
# Layouts: which HF class fits a model, and its config.json
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    arch: str  # the HF class, written to config.json "architectures"
    model_type: str
    task: str  # our task of an imported model
    hf_config: Callable[[Config], dict[str, Any]]
    auto_class: str  # the transformers Auto class that loads it


# our activation -> HF's name, and HF names -> ours (gelu_new is GPT-2's tanh approximation)
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
ACTIVATION_OF_HF = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_fast": "gelu_tanh"}


def _act(m: ModelConfig) -> str:
    return HF_ACTIVATION[m.activation]


def _seq2seq_config(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    n_dec = m.n_decoder_layers if m.n_decoder_layers is not None else m.n_layers
    return dict(
        vocab_size=m.vocab_size, decoder_vocab_size=m.vocab_size, d_model=m.d_model,
        encoder_layers=m.n_layers, decoder_layers=n_dec,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function=_act(m),
        max_position_embeddings=m.max_len, scale_embedding=m.scale_embedding,
        dropout=m.dropout, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, is_encoder_decoder=True,
    )


def _gpt2_config(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return dict(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.n_layers,
        n_head=m.n_heads, n_inner=m.d_ff, activation_function=_act(m), layer_norm_epsilon=m.norm_eps,
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=m.tie_embeddings,
    )


def _encoder_config(cfg: Config, position_offset: int) -> dict[str, Any]:
    """BERT and XLM-RoBERTa-XL share their config keys; the latter numbers positions from PAD + 1."""
    m = cfg.model
    out = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, intermediate_size=m.d_ff, hidden_act=_act(m),
        max_position_embeddings=m.max_len + position_offset, type_vocab_size=1, layer_norm_eps=m.norm_eps,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=0.0,
        pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID,
        position_embedding_type="absolute",
        # tied only when the exported embedding is ours unscaled (see the module docstring)
        tie_word_embeddings=m.tie_embeddings and not m.scale_embedding,
    )
    if m.head == "tagging":
        out["num_labels"] = m.num_labels
    return out


def _xlmr_xl_config(cfg: Config) -> dict[str, Any]:
    return _encoder_config(cfg, PAD_ID + 1)


def _bert_config(cfg: Config) -> dict[str, Any]:
    return _encoder_config(cfg, 0)


LAYOUTS: dict[str, Layout] = {
    "PegasusForConditionalGeneration": Layout(
        "PegasusForConditionalGeneration", "pegasus", "translation", _seq2seq_config, "AutoModelForSeq2SeqLM"),
    "MarianMTModel": Layout("MarianMTModel", "marian", "translation", _seq2seq_config, "AutoModelForSeq2SeqLM"),
    "GPT2LMHeadModel": Layout("GPT2LMHeadModel", "gpt2", "lm", _gpt2_config, "AutoModelForCausalLM"),
    "XLMRobertaXLForMaskedLM": Layout(
        "XLMRobertaXLForMaskedLM", "xlm-roberta-xl", "mlm", _xlmr_xl_config, "AutoModelForMaskedLM"),
    "XLMRobertaXLForTokenClassification": Layout(
        "XLMRobertaXLForTokenClassification", "xlm-roberta-xl", "ner", _xlmr_xl_config,
        "AutoModelForTokenClassification"),
    "BertForMaskedLM": Layout("BertForMaskedLM", "bert", "mlm", _bert_config, "AutoModelForMaskedLM"),
    "BertForTokenClassification": Layout(
        "BertForTokenClassification", "bert", "ner", _bert_config, "AutoModelForTokenClassification"),
}
# Bare encoders (no head) import as MLM models whose head starts fresh, e.g. for init_from.
BARE = {"BertModel": ("BertForMaskedLM", "bert."), "XLMRobertaXLModel": ("XLMRobertaXLForMaskedLM", "roberta.")}
ENCODER_TYPES = ("bert", "xlm-roberta-xl")


def _common_refusal(m: ModelConfig) -> str | None:
    """What no layout here carries, or None."""
    if m.norm != "layernorm":
        return "model.norm=rmsnorm (exportable: layernorm)"
    if m.activation == "swiglu":
        return "model.activation=swiglu (exportable: gelu, gelu_tanh or relu)"
    if m.n_kv_heads not in (None, m.n_heads):
        return "model.n_kv_heads (grouped-query attention; exportable: n_kv_heads equal to n_heads)"
    if not m.bias:
        return "model.bias=false (exportable: bias=true)"
    return None


def choose_layout(cfg: Config) -> Layout:
    """The HF layout that computes the same function as `cfg`'s model, or a one-line UserError."""
    m = cfg.model
    reason = _common_refusal(m)
    arch = None
    if reason is None and m.family == "encoder_decoder":
        arch = "PegasusForConditionalGeneration" if m.norm_first else "MarianMTModel"
        if m.position != "sinusoidal":
            reason = f"model.position={m.position} in an encoder-decoder (exportable: sinusoidal, as Marian and Pegasus)"
        elif not m.tie_embeddings:
            reason = "model.tie_embeddings=false in an encoder-decoder (exportable: tied, as Marian and Pegasus)"
        elif m.norm_eps != 1e-5 or m.d_model % 2:
            reason = "model.norm_eps other than 1e-5 or an odd d_model (Marian and Pegasus fix both)"
    elif reason is None and m.family == "decoder":
        arch = "GPT2LMHeadModel"
        if m.position != "learned" or not m.norm_first:
            reason = (f"model.position={m.position}, norm_first={m.norm_first} in a decoder "
                      "(exportable: position=learned with norm_first=true, the GPT-2 layout)")
        elif m.scale_embedding:
            reason = "model.scale_embedding=true in a decoder (exportable: false, as GPT-2)"
    elif reason is None and m.family == "encoder":
        arch, reason = _encoder_arch(m)
    if reason is not None:
        raise UserError(f"cannot export this {m.family} model to Hugging Face: {reason}")
    return LAYOUTS[arch]


def _encoder_arch(m: ModelConfig) -> tuple[str | None, str | None]:
    """(HF class, None) for an exportable encoder, else (None, why not)."""
    family = "XLMRobertaXL" if m.norm_first else "Bert"
    arch = {"mlm": f"{family}ForMaskedLM", "tagging": f"{family}ForTokenClassification"}.get(m.head)
    if arch is None:
        return None, f"model.head={m.head}: transformers has no class for our entity-marker relation head"
    if m.char_cnn:
        return None, "model.char_cnn (HF token classifiers read subword ids only; exportable: char_cnn=0)"
    if m.position != "learned":
        return None, (f"model.position={m.position} in an encoder: transformers has no rotary encoder of "
                      "our layout (RoFormer normalises its embeddings and is post-norm; exportable: "
                      "position=learned)")
    if m.embed_norm == m.norm_first:
        return None, (f"model.embed_norm={m.embed_norm} with norm_first={m.norm_first} (exportable: pre-norm "
                      "without an embedding norm, XLM-RoBERTa-XL; post-norm with one, BERT)")
    return arch, None


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------

# Our keys by how they touch the residual stream: weights that read it (their input
# columns are residual dims) and tensors that write or live in it (their rows are).
_READS = (".qkv.weight", ".cross_attn.q.weight", ".cross_attn.kv.weight", ".ffn.up.weight")
_WRITES = (".out.weight", ".out.bias", ".ffn.down.weight", ".ffn.down.bias")


def _residual_axis(key: str) -> int | None:
    if key.endswith(_READS) or key in ("tok_embed.weight", "lm_head.weight", "tgt_tok_embed.weight"):
        return 1
    if key.endswith(_WRITES) or "norm." in key:
        return 0
    return None


def half_split_permutation(d_model: int) -> torch.Tensor:
    """perm (D,): HF dim j holds our dim perm[j] (sines 0, 2, 4, ... first, then cosines 1, 3, 5, ...)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def permute_residual(state: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same model with its residual-stream dimensions reordered by `perm`."""
    out = {}
    for key, t in state.items():
        axis = _residual_axis(key)
        out[key] = t if axis is None else t.index_select(axis, perm)
    return out


def _n_dec(m: ModelConfig) -> int:
    return m.n_decoder_layers if m.n_decoder_layers is not None else m.n_layers


def to_hf_state(state: dict[str, torch.Tensor], cfg: Config, layout: Layout) -> dict[str, torch.Tensor]:
    """Our state dict (tied weights stored once) -> HF tensors, tied copies included."""
    m = cfg.model
    if m.family == "encoder_decoder":
        state = permute_residual(state, half_split_permutation(m.d_model))
    state = dict(state)
    scale = math.sqrt(m.d_model) if m.scale_embedding else 1.0
    if layout.model_type == "xlm-roberta-xl":
        pos = state["pos_embed.weight"]  # (L, D) -> (PAD + 1 + L, D): HF numbers positions from PAD + 1
        state["pos_embed.weight"] = torch.cat([pos.new_zeros(PAD_ID + 1, pos.shape[1]), pos])
    if layout.model_type in ENCODER_TYPES:
        if m.head == "mlm" and "head.decoder.weight" not in state and scale != 1.0:
            state["head.decoder.weight"] = state["tok_embed.weight"]  # the head keeps the unscaled rows
        state["tok_embed.weight"] = state["tok_embed.weight"] * scale
    out: dict[str, torch.Tensor] = {}
    for ours, hf in expand(layout.arch, m.n_layers, _n_dec(m)).items():
        if ours not in state:
            continue  # e.g. head.decoder.weight of a tied MLM head
        t = state[ours]
        if hf.transform == "transpose":
            t = t.T
        for hf_key, part in zip(hf.keys, t.chunk(len(hf.keys), dim=0)):
            out[hf_key] = part.contiguous()
    tied = TIED[layout.arch] if _hf_tied(layout, m) else ()
    for key in tied:
        out[key] = out[_embedding_key(layout)]
    if layout.model_type == "xlm-roberta-xl":
        out["roberta.embeddings.token_type_embeddings.weight"] = torch.zeros(1, m.d_model)
        if m.head == "mlm":
            out["lm_head.decoder.bias"] = out["lm_head.bias"]
            out.setdefault("lm_head.decoder.weight", out["roberta.embeddings.word_embeddings.weight"])
    if layout.model_type == "bert":
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, m.d_model)
        if m.head == "mlm":
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
            if "head.decoder.weight" in state:  # untied (or scaled): its own rows
                out["cls.predictions.decoder.weight"] = state["head.decoder.weight"]
    if layout.model_type in ("marian", "pegasus"):
        out["final_logits_bias"] = torch.zeros(1, m.vocab_size)
    return out


def _embedding_key(layout: Layout) -> str:
    return next(hf.keys[0] for ours, hf in expand(layout.arch, 0).items() if ours == "tok_embed.weight")


def _hf_tied(layout: Layout, m: ModelConfig) -> bool:
    if layout.model_type in ENCODER_TYPES:
        return m.tie_embeddings and not m.scale_embedding
    return m.tie_embeddings


def from_hf_state(hf: dict[str, torch.Tensor], cfg: Config, layout: Layout,
                  pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict: `to_hf_state` backwards (`pad_id`: the checkpoint's own)."""
    m = cfg.model
    out: dict[str, torch.Tensor] = {}
    for ours, name in expand(layout.arch, m.n_layers, _n_dec(m)).items():
        if not all(k in hf for k in name.keys):
            continue
        t = torch.cat([hf[k] for k in name.keys], dim=0)
        out[ours] = (t.T if name.transform == "transpose" else t).contiguous()
    if layout.model_type in ENCODER_TYPES:
        prefix = "roberta" if layout.model_type == "xlm-roberta-xl" else "bert"
        if prefix == "roberta":
            out["pos_embed.weight"] = out["pos_embed.weight"][pad_id + 1:].contiguous()
        token_type = hf.get(f"{prefix}.embeddings.token_type_embeddings.weight")
        if token_type is not None:  # added to every token: the same as adding it to every position
            out["pos_embed.weight"] = out["pos_embed.weight"] + token_type[0]
        if m.head == "mlm" and m.tie_embeddings:
            out.pop("head.decoder.weight", None)
        elif m.head == "mlm" and "cls.predictions.decoder.weight" in hf:
            out["head.decoder.weight"] = hf["cls.predictions.decoder.weight"]
    if m.family == "encoder_decoder":
        out = permute_residual(out, torch.argsort(half_split_permutation(m.d_model)))
    return out


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def export_hf(loaded, out: Path) -> list[str]:
    """Write `loaded` (a `LoadedModel`) into the empty dir `out` as a transformers directory.

    Returns the notes of what HF does not carry (also in the model card). The
    written model is loaded back and its config checked before returning.
    """
    transformers = require("transformers")
    cfg: Config = loaded.cfg
    if loaded.compression:
        raise UserError(f"{loaded.path}: a pruned or quantized model; export the model it was made from "
                        "(transformers classes have one width per layer and float weights)")
    layout = choose_layout(cfg)
    from trainformer.modeldir import clean_state_dict

    state = {k: v.float() for k, v in clean_state_dict(loaded.model.state_dict()).items()}
    hf_cfg = transformers.AutoConfig.for_model(layout.model_type, **layout.hf_config(cfg))
    hf_cfg.architectures = [layout.arch]
    if cfg.task == "ner":
        hf_cfg.id2label = dict(enumerate(loaded.labels))
        hf_cfg.label2id = {label: i for i, label in enumerate(loaded.labels)}
    model_cls = getattr(transformers, layout.arch)
    hf_model = model_cls(hf_cfg).eval()
    target = hf_model.state_dict()
    ours = to_hf_state(state, cfg, layout)
    _check_positions(ours, target, layout)
    missing = [k for k in target if k not in ours and not _buffer_like(k)]
    if missing:
        raise RuntimeError(f"export to {layout.arch}: no value for {missing[:4]}")
    with torch.no_grad():
        for key, value in ours.items():
            if key in target:
                target[key].copy_(value)
    with quiet_transformers(transformers):
        hf_model.save_pretrained(str(out))
    save_hf_tokenizer(loaded.tokenizer_path, cfg, out)
    gen = generation_config(cfg)
    if gen is not None:
        transformers.GenerationConfig(**gen).save_pretrained(str(out))
    notes = export_notes(cfg)
    (out / "README.md").write_text(model_card(cfg, layout.arch, loaded.path, notes), encoding="utf-8")
    (out / "trainformer.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    return notes


@contextlib.contextmanager
def quiet_transformers(transformers) -> Iterator[None]:
    """No transformers progress bars on stderr while we write (our output stays one line per event)."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _buffer_like(key: str) -> bool:
    """HF state keys that are computed, not learned (positions of sinusoid tables, masks)."""
    return key.endswith(("embed_positions.weight", "attn.bias", "attn.masked_bias", "position_ids"))


def _check_positions(ours: dict[str, torch.Tensor], target: dict[str, torch.Tensor], layout: Layout) -> None:
    """Marian/Pegasus compute their sinusoid table; our permuted model relies on it being the same formula."""
    if layout.model_type not in ("marian", "pegasus"):
        return
    from trainformer.nn.embedding import sinusoid_table

    hf_table = target["model.encoder.embed_positions.weight"]
    ours_table = sinusoid_table(*hf_table.shape).index_select(1, half_split_permutation(hf_table.shape[1]))
    if (hf_table - ours_table).abs().max() > 1e-4:
        raise RuntimeError(f"{layout.arch}: this transformers version's sinusoid table differs from ours")

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

Import runs the same maps backwards: `import_hf_dir` converts an HF directory
of these classes into one of our model dirs (in the cache), which every verb
and ``init_from`` then read as usual.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainformer.config import Config, ModelConfig, from_dict, to_dict
from trainformer.data.tokenizer import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
)
from trainformer.errors import UserError
from trainformer.interop.hf_vocab import plan, remap_rows, remap_tokenizer, special_roles
from trainformer.models.hf_names import TIED, expand

EXTRA_HINT = 'pip install -e ".[export]"'


def require(module: str):
    """Import an optional dependency, or a one-line error naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed; it comes with the export extra: {EXTRA_HINT}") from None


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
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_OUR_ACT = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_fast": "gelu_tanh"}


def _act(m: ModelConfig) -> str:
    return _HF_ACT[m.activation]


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
        decoder_start_token_id=BOS_ID, forced_eos_token_id=EOS_ID,
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
# Tokenizer, generation config, model card
# ----------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{{ message['content'] | trim | replace('<|system|>', '< |system|>') | replace('<|user|>', '< |user|>')"
    " | replace('<|assistant|>', '< |assistant|>') | replace('<|end|>', '< |end|>') }}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _post_processor(task: str):
    """What our pipeline adds around a text, as a `tokenizers` post-processor (None: nothing)."""
    from tokenizers import processors

    pad, unk, bos, eos, mask, sep, cls = SPECIAL_TOKENS
    if task == "translation":  # sources end with </s>
        return processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, EOS_ID)])
    if task in ("ner", "mlm"):  # <cls> words <sep>
        return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                                             special_tokens=[(cls, CLS_ID), (sep, SEP_ID)])
    return None


def save_hf_tokenizer(tokenizer_json: Path, cfg: Config, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer` loads, giving our ids."""
    from tokenizers import Tokenizer

    transformers = require("transformers")
    tok = Tokenizer.from_file(str(tokenizer_json))
    post = _post_processor(cfg.task)
    if post is not None:
        tok.post_processor = post
    pad, unk, bos, eos, mask, sep, cls = SPECIAL_TOKENS
    is_lm = cfg.task in ("lm", "chat")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=eos if is_lm else bos, eos_token=eos,
        mask_token=mask, sep_token=sep, cls_token=cls, model_max_length=cfg.model.max_len,
        clean_up_tokenization_spaces=False,
    )
    if tok.token_to_id("<|assistant|>") is not None:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def generation_config(cfg: Config) -> dict[str, Any] | None:
    """generation_config.json: how our translate / chat decode by default."""
    if cfg.task == "translation":
        return dict(decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                    pad_token_id=PAD_ID, forced_eos_token_id=EOS_ID, num_beams=cfg.eval.beam,
                    length_penalty=cfg.eval.length_penalty, max_length=cfg.model.max_len,
                    early_stopping=True)
    if cfg.task in ("lm", "chat"):
        return dict(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                    max_length=cfg.model.max_len)
    return None


def _summary(model_dir: Path) -> dict[str, Any]:
    """The run's summary.json when the model dir sits in a run dir (model_dir = RUN/model)."""
    path = model_dir.parent / "summary.json"
    if model_dir.name == "model" and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


# Where each built-in dataset comes from and its licence (see the data README), for model cards.
DATA_SOURCES = {
    "tatoeba-en-fr": "Tatoeba English-French pairs via manythings.org/anki (CC-BY 2.0 France; "
    "attribution: www.manythings.org/anki and tatoeba.org)",
    "conll2003": "CoNLL-2003 English NER (Reuters RCV1 text: research use only)",
    "wnut17": "WNUT-17 emerging entities (CC-BY 4.0)",
    "semeval2010": "SemEval-2010 Task 8 relations (CC-BY 3.0)",
    "dailydialog": "DailyDialog (CC BY-NC-SA 4.0: non-commercial)",
    "tinyshakespeare": "Tiny Shakespeare (public domain text)",
    "tinystories": "TinyStories sample (CDLA-Sharing-1.0)",
}


def model_card(cfg: Config, layout: Layout, source: Path, notes: list[str]) -> str:
    """README.md of an export: task, data, metrics of the run, how it was made, what HF does not carry."""
    m = cfg.model
    summary = _summary(source)
    data_line = f"`{cfg.data.dataset}`"
    if cfg.data.dataset in DATA_SOURCES:
        data_line += f": {DATA_SOURCES[cfg.data.dataset]}"
    lines = [
        "---", "library_name: transformers", f"tags: [trainformer, {cfg.task}]", "---", "",
        f"# {cfg.name}: a trainformer {cfg.task} model as `{layout.arch}`", "",
        f"Trained with trainformer's recipe `{cfg.name}`"
        + (f" ({cfg.description.strip()})" if cfg.description.strip() else "") + ".", "",
        f"- Task: {cfg.task}; data: {data_line}",
        f"- Model: {m.family}, {m.n_layers} layers"
        + (f" + {_n_dec(m)} decoder layers" if m.family == "encoder_decoder" else "")
        + f", d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, vocabulary {m.vocab_size}, "
        f"positions {m.position}, {'pre' if m.norm_first else 'post'}-norm",
    ]
    metrics = {k: v for k, v in summary.items() if k.startswith(("test_", "valid_", "best_"))
               and isinstance(v, (int, float))}
    if metrics:
        lines.append("- Metrics of the training run: " + ", ".join(f"{k} {v}" for k, v in sorted(metrics.items())))
    if summary.get("steps"):
        lines.append(f"- Training: {summary['steps']} steps")
    lines += ["", "## Use", "", "```python"]
    lines += _usage(cfg, layout)
    lines += ["```", "", "## Made with", "", "```bash",
              f"trainformer train {cfg.name}" + "   # the recipe", "trainformer export MODEL_DIR --to hf --out DIR",
              "```"]
    if notes:
        lines += ["", "## What the Hugging Face class does not carry", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _usage(cfg: Config, layout: Layout) -> list[str]:
    if cfg.task == "translation":
        return ["from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
                'tokenizer = AutoTokenizer.from_pretrained("DIR")',
                'model = AutoModelForSeq2SeqLM.from_pretrained("DIR")',
                'batch = tokenizer(["Where is the station?"], return_tensors="pt", padding=True)',
                "print(tokenizer.batch_decode(model.generate(**batch), skip_special_tokens=True))"]
    if cfg.task in ("lm", "chat"):
        return ["from transformers import pipeline", 'generate = pipeline("text-generation", model="DIR")',
                'print(generate("Once upon a time", max_new_tokens=40)[0]["generated_text"])']
    if cfg.task == "ner":
        return ["from transformers import pipeline",
                'tag = pipeline("token-classification", model="DIR", aggregation_strategy="first")',
                'print(tag("Angela Merkel visited Paris."))']
    return ["from transformers import pipeline", 'fill = pipeline("fill-mask", model="DIR")',
            'print(fill("Paris is the <mask> of France."))']


def export_notes(cfg: Config) -> list[str]:
    """Parts of our model or decoding that the HF class leaves out."""
    notes = []
    if cfg.task == "ner" and cfg.model.crf:
        notes.append("The CRF's tag-transition scores (and trainformer's Viterbi decoding with the tag-bigram "
                     "prior): HF token classification takes the argmax of each token's scores, so its tags "
                     "can break BIO order and its F1 is lower than `trainformer extract`'s.")
    if cfg.task == "ner":
        notes.append("Word-level tagging: trainformer tags the first subword of each word; use "
                     "`aggregation_strategy=\"first\"` in the pipeline for the same reading.")
    if cfg.task == "translation":
        notes.append("Length limit: trainformer stops at eval.max_len_a x source length + eval.max_len_b "
                     f"({cfg.eval.max_len_a} x + {cfg.eval.max_len_b}) tokens; generation_config.json "
                     "holds a fixed max_length instead.")
    return notes


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
    hf_model.save_pretrained(str(out))
    save_hf_tokenizer(loaded.tokenizer_path, cfg, out)
    gen = generation_config(cfg)
    if gen is not None:
        transformers.GenerationConfig(**gen).save_pretrained(str(out))
    notes = export_notes(cfg)
    (out / "README.md").write_text(model_card(cfg, layout, loaded.path, notes), encoding="utf-8")
    (out / "trainformer.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    return notes


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


# ----------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------


def is_hf_dir(path: Path) -> bool:
    """A transformers directory (its config.json names a model_type, ours never does)."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data and "task" not in data


def _our_config(hf: dict[str, Any], layout: Layout, trainformer_cfg: dict[str, Any] | None) -> Config:
    """Our Config of an HF config: the shape from HF's keys; the rest from trainformer.json when present."""
    base = dict(trainformer_cfg or {})
    base.setdefault("name", hf.get("_name_or_path") or layout.model_type)
    base["task"] = base.get("task", layout.task)
    model = dict(base.get("model", {}))
    t = layout.model_type
    if t in ("marian", "pegasus"):
        model |= dict(family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
                      n_heads=hf["encoder_attention_heads"], n_layers=hf["encoder_layers"],
                      n_decoder_layers=hf["decoder_layers"], d_ff=hf["encoder_ffn_dim"],
                      max_len=hf["max_position_embeddings"], position="sinusoidal", norm_first=t == "pegasus",
                      activation=_our_act(hf.get("activation_function", "gelu")), scale_embedding=hf.get("scale_embedding", False),
                      tie_embeddings=True, norm_eps=1e-5)
    elif t == "gpt2":
        model |= dict(family="decoder", vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_heads=hf["n_head"],
                      n_layers=hf["n_layer"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                      max_len=hf["n_positions"], position="learned", norm_first=True,
                      activation=_our_act(hf.get("activation_function", "gelu")), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      scale_embedding=False, tie_embeddings=hf.get("tie_word_embeddings", True))
    else:
        offset = (hf.get("pad_token_id") or 0) + 1 if t == "xlm-roberta-xl" else 0
        model |= dict(family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                      n_heads=hf["num_attention_heads"], n_layers=hf["num_hidden_layers"],
                      d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"] - offset,
                      position="learned", norm_first=t != "bert", embed_norm=t == "bert",
                      activation=_our_act(hf.get("hidden_act", "gelu")), norm_eps=hf.get("layer_norm_eps", 1e-12),
                      head="mlm" if layout.task == "mlm" else "tagging")
        # the HF class has no embedding scale: an exported scale is already in the weights
        model["scale_embedding"] = False
        if layout.task == "mlm":
            model["tie_embeddings"] = hf.get("tie_word_embeddings", True)
        else:
            model["num_labels"] = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
            model["crf"] = False  # HF carries no CRF scores
            model["char_cnn"] = 0
    model.pop("preset", None)
    base["model"] = model
    base.pop("init_from", None)
    return from_dict(base)


def _our_act(name: str) -> str:
    if name not in _OUR_ACT:
        raise UserError(f"activation {name!r} of this checkpoint is not one of ours ({', '.join(_OUR_ACT)})")
    return _OUR_ACT[name]


def _labels(hf: dict[str, Any]) -> list[str]:
    id2label = hf.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else []


def import_hf_dir(path: Path, out: Path | None = None) -> Path:
    """Convert the transformers dir `path` to one of our model dirs (cached by content); returns it."""
    from safetensors.torch import load_file, save_file

    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'config.json'}: unreadable ({e})") from None
    arch = (hf.get("architectures") or [""])[0]
    bare_prefix = ""
    if arch in BARE:
        arch, bare_prefix = BARE[arch]
    if arch not in LAYOUTS:
        raise UserError(f"{path}: a {arch or hf.get('model_type')} model; trainformer imports "
                        f"{', '.join([*LAYOUTS, *BARE])}")
    layout = LAYOUTS[arch]
    weights, tok = path / "model.safetensors", path / "tokenizer.json"
    for f in (weights, tok):
        if not f.is_file():
            raise UserError(f"{path}: {f.name} is missing (import reads safetensors weights and a fast tokenizer)")
    out = out or _import_cache(path)
    if (out / "config.json").is_file():
        return out
    tf = path / "trainformer.json"
    cfg = _our_config(hf, layout, json.loads(tf.read_text(encoding="utf-8")) if tf.is_file() else None)
    hf_state = load_file(str(weights))
    if bare_prefix:  # a bare encoder's keys lack the task model's prefix; its MLM head starts fresh
        hf_state = {k if k.startswith(bare_prefix) else bare_prefix + k: v for k, v in hf_state.items()}
    state = from_hf_state(hf_state, cfg, layout, hf.get("pad_token_id") or 0)
    if bare_prefix:
        state = _with_fresh_head(state, cfg)
    tok_data = json.loads(tok.read_text(encoding="utf-8"))
    vocab = plan(tok_data, special_roles(path))
    if not vocab.identity:  # a vocabulary trained elsewhere: our special tokens to ids 0-6
        state = remap_rows(state, vocab)
        cfg.model.vocab_size = len(vocab.old_of_new)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    tok_data = remap_tokenizer(tok_data, vocab)  # also drops the export's post-processor
    (tmp / "tokenizer.json").write_text(json.dumps(tok_data, ensure_ascii=False), encoding="utf-8")
    if cfg.task == "ner":
        (tmp / "labels.json").write_text(json.dumps(_labels(hf)) + "\n", encoding="utf-8")
    (tmp / "imported_from.json").write_text(json.dumps({"path": str(path.resolve()), "arch": arch}) + "\n",
                                            encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _with_fresh_head(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The head tensors a bare encoder lacks, initialised as a new model's are."""
    from trainformer.modeldir import clean_state_dict
    from trainformer.models import build_model

    fresh = clean_state_dict(build_model(cfg.model).state_dict())
    return {k: state.get(k, v) for k, v in fresh.items()}


def _import_cache(path: Path) -> Path:
    from trainformer.paths import cache_dir

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainformer.json"):
        f = path / name
        if f.is_file():
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(path.resolve()).encode())
    return cache_dir("hf-import") / h.hexdigest()[:16]

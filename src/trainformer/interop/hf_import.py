"""A transformers directory -> one of our model dirs (`trainformer.interop.hf` backwards).

`import_hf_dir` reads an HF directory of a class we export (or a bare
``BertModel`` / ``XLMRobertaXLModel``, whose MLM head then starts fresh),
converts the weights through the same name map, renumbers a foreign
vocabulary (`hf_vocab`), and writes a model dir into the cache, keyed by the
files' sizes and times. `trainformer.modeldir.resolve_model_dir` calls it,
so every verb and ``init_from`` accept an HF directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trainformer.config import Config, from_dict, to_dict
from trainformer.errors import UserError
from trainformer.interop.hf import ACTIVATION_OF_HF, BARE, LAYOUTS, Layout, from_hf_state
from trainformer.interop.hf_vocab import plan, remap_rows, remap_tokenizer, special_roles


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
    if name not in ACTIVATION_OF_HF:
        raise UserError(f"activation {name!r} of this checkpoint is not one of ours ({', '.join(ACTIVATION_OF_HF)})")
    return ACTIVATION_OF_HF[name]


def _labels(hf: dict[str, Any]) -> list[str]:
    id2label = hf.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else []


def import_hf_dir(path: Path, out: Path | None = None) -> Path:
    """Convert the transformers dir `path` to one of our model dirs (cached by content); returns it."""
    from safetensors.torch import save_file

    from trainformer.modeldir import read_weights

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
    hf_state, _ = read_weights(weights)
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

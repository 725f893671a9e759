"""The `model/` directory that every inference verb accepts.

    model/
      model.safetensors   weights under the model's own parameter names
      config.json         the resolved training config (model shape, task, data settings)
      tokenizer.json      the HF `tokenizers` file
      labels.json         label names, for tagging / relation models
      transitions.json    NER only: the tag-bigram prior used in Viterbi decoding, with its weight
      compression.json    present for pruned / quantized models (see trainformer.compression)

Loading never executes code: weights come from safetensors, the rest is JSON.
A run directory is accepted too (its `model/` is used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from trainformer.config import Config, ModelConfig, from_dict, to_dict
from trainformer.errors import ConfigError, UserError
from trainformer.models import build_model

ENSEMBLE_MANIFEST = "ensemble.json"  # marks an ensemble of model dirs (see trainformer.inference.ensemble)


@dataclass
class LoadedModel:
    cfg: Config
    model: nn.Module
    path: Path
    labels: list[str] = field(default_factory=list)
    compression: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


# Prefixes that wrappers add to parameter names: torch.compile, DDP, checkpoint/FSDP1 wrappers.
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_key(name: str) -> str:
    """A parameter name without wrapper prefixes: the model's own name (a stable interface)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop aliases of shared tensors (tied embeddings): safetensors stores each tensor once.

    Returns (unique tensors, {alias: name kept}); the first name in model order is kept.
    """
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype) if tensor.numel() and tensor.device.type != "meta" else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = tensor
    return unique, aliases


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keys without wrapper prefixes, detached, contiguous and on the CPU so safetensors
    can write them; tied weights are stored once (`load_state_dict(strict=False)` + tying restores them)."""
    named = {clean_key(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    unique, _ = split_tied(named)
    return {k: v.detach().contiguous().cpu() for k, v in unique.items()}


def write_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors; tied aliases are listed in the metadata ("tied")."""
    unique, aliases = split_tied({clean_key(k): v for k, v in state.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unique.items()}
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["tied"] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a one-line UserError if it is missing or corrupt."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def resolve_model_dir(path: str | Path) -> Path:
    """MODEL_DIR or RUN_DIR -> the folder holding model.safetensors and config.json.

    A Hugging Face transformers directory of a class we import (see
    `trainformer.interop.hf`) is converted once into a model dir in the cache,
    which is returned instead.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"model directory not found: {p}")
    if (p / "model" / "config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: not a model directory (expected config.json and model.safetensors)")
    return from_hf_if_needed(p)


def from_hf_if_needed(path: Path) -> Path:
    """`path` itself, or the model dir converted from it when it is a transformers directory."""
    from trainformer.interop.hf_import import import_hf_dir, is_hf_dir

    return import_hf_dir(path) if path.is_dir() and is_hf_dir(path) else path


def save_model_dir(model: nn.Module | dict[str, torch.Tensor], cfg: Config, out: Path) -> Path:
    """Write weights and config.json into `out` (created). Task artifacts are added by the task."""
    out.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    write_weights(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    return out


def read_model_config(path: str | Path) -> Config:
    p = resolve_model_dir(path)
    try:
        data = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p / 'config.json'}: unreadable ({e})") from None
    return from_dict(data)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model described by `config.json` and load its weights (eval mode)."""
    p = resolve_model_dir(path)
    if (p / ENSEMBLE_MANIFEST).is_file():
        raise UserError(f"{p}: an ensemble of several models; only `evaluate` and `extract` of ner and "
                        "relation models read ensembles (give one of its member-* folders here)")
    cfg = read_model_config(p)
    compression = read_json_object(p / "compression.json") if (p / "compression.json").is_file() else {}
    sizes_from = "config.json"
    if compression.get("pruned") and not cfg.model.layer_sizes:  # pruned before config.json had them
        if not isinstance(compression["pruned"], dict):
            raise UserError(f"{p / 'compression.json'}: \"pruned\" must be an object of per-layer sizes, "
                            f"got {compression['pruned']!r}")
        cfg.model.layer_sizes, sizes_from = dict(compression["pruned"]), "compression.json"
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{p}: model.safetensors is missing")
    state, _ = read_weights(weights)
    try:
        model = _build_and_load(cfg, compression, state, weights, device)
    except ConfigError as e:  # e.g. a per-layer size the model does not have
        raise ConfigError(f"{p / sizes_from}: {e}") from None
    model.eval()
    labels = []
    if (p / "labels.json").is_file():
        labels = json.loads((p / "labels.json").read_text(encoding="utf-8"))
    return LoadedModel(cfg=cfg, model=model, path=p, labels=labels, compression=compression)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; a one-line `UserError` naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _build_and_load(cfg: Config, compression: dict[str, Any], state: dict[str, torch.Tensor],
                    weights: Path, device: str | torch.device) -> nn.Module:
    """The model of `cfg` (quantized as `compression` says) holding the tensors of `state`."""
    if compression.get("quantized"):
        from trainformer.models.quantized import load_quantized  # (torch.ao, imported when needed)

        return load_quantized(state, cfg, compression, weights, device)
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in _tied_names(model)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device)


def _tied_names(model: nn.Module):
    """Parameter names that share storage with an earlier parameter (dropped on save)."""
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            yield name, seen[ptr]
        else:
            seen[ptr] = name


# ----------------------------------------------------------------------------
# Starting from a pretrained model (`init_from`)
# ----------------------------------------------------------------------------


def pretrained(init_from: str | Path, family: str, hint: str) -> tuple[Path, Config]:
    """The model dir of `init_from` (a model dir, a run dir or a transformers dir) and its config.

    A one-line error when it is not a trained model with a tokenizer, or not of `family`
    (`hint` says how to train one).
    """
    p = Path(init_from)
    for candidate in (p / "model", p):
        if (candidate / "config.json").is_file() and (candidate / "tokenizer.json").is_file():
            src = from_hf_if_needed(candidate)
            pre = read_model_config(src)
            if pre.model.family != family:
                raise ConfigError(f"init_from: {src} holds a {pre.task!r} {pre.model.family} model; "
                                f"expected a {family} ({hint})")
            return src, pre
    raise ConfigError(f"init_from: {p} is not a trained model (expected config.json and tokenizer.json in it "
                      f"or in its model/); {hint}")


def take_pretrained_shape(model: ModelConfig, pre: ModelConfig, own: set[str]) -> list[str]:
    """Copy every `ModelConfig` key that shapes the weights from `pre` into `model`, except `own`
    (the fine-tuning task's: head, labels, dropout...); returns the changes, as "key old -> new"."""
    changed = []
    for f in fields(ModelConfig):
        if f.name in own:
            continue
        old, new = getattr(model, f.name), getattr(pre, f.name)
        if old != new and not (f.name == "vocab_size" and old == 0):
            changed.append(f"model.{f.name} {old} -> {new}")
        setattr(model, f.name, new)
    return changed

"""Reading and writing compressed model dirs: weights, config.json, task files, compression.json.

``compression.json`` (format 1):

    {"format": 1,
     "quantized": true, "quantization": "dynamic",       # quantization only
     "history": [{"op": "prune", "method": "structured", "sparsity": 0.5, ...},
                 {"op": "quantize", "method": "dynamic", ...}]}

A structurally pruned model's per-layer sizes are config.json's ``model.layer_sizes``;
dirs written before that field existed kept them here as ``"pruned"`` (still read).

Only safetensors and JSON are written, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainformer.config import Config
from trainformer.errors import UserError
from trainformer.modeldir import (
    LoadedModel,
    load_model_dir,
    read_json_object,
    resolve_model_dir,
    save_model_dir,
)

COMPRESSION_FILE = "compression.json"
FORMAT = 1
_OWN_FILES = ("model.safetensors", "config.json", COMPRESSION_FILE)


def read_compression(model_dir: str | Path) -> dict[str, Any]:
    """The parsed compression.json of a model dir ({} for an uncompressed model)."""
    path = resolve_model_dir(model_dir) / COMPRESSION_FILE
    return read_json_object(path) if path.is_file() else {}


def load_float_model(model_dir: str | Path) -> LoadedModel:
    """A model dir's model in float (fp32) for pruning or quantizing; a quantized one is refused."""
    compression = read_compression(model_dir)
    if compression.get("quantized"):
        raise UserError(f"{model_dir}: already quantized ({compression.get('quantization')}); "
                        "prune or quantize its float model instead")
    loaded = load_model_dir(model_dir, "cpu")
    loaded.model.float()
    return loaded


def check_out_dir(source: Path, out: Path) -> None:
    """--out must be a new (or empty) folder other than the source model dir."""
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out}: is the input model dir; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty; choose a new folder")


def with_step(previous: dict[str, Any], step: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A new compression.json: `previous` with `fields` set and `step` appended to its history."""
    return {**previous, "format": FORMAT, **fields, "history": [*previous.get("history", []), step]}


def save_compressed(
    out: Path,
    weights: nn.Module | dict[str, torch.Tensor],
    cfg: Config,
    source: Path,
    compression: dict[str, Any],
) -> Path:
    """Write a compressed model dir: model.safetensors, config.json, compression.json and the
    source dir's task files (tokenizer.json, labels.json, ...; JSON only).

    Args:
        out: the folder to write (created).
        weights: a model or the tensors to save (tied tensors are stored once).
        cfg: the model's config (written as config.json).
        source: the model dir it came from (task files are copied from it).
        compression: the content of compression.json.
    """
    save_model_dir(weights, cfg, out)
    for f in sorted(resolve_model_dir(source).glob("*.json")):
        if f.name not in _OWN_FILES:
            shutil.copy2(f, out / f.name)
    (out / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2) + "\n", encoding="utf-8")
    return out


def dir_bytes(path: str | Path) -> int:
    """Size on disk of the weights file of a model dir (bytes)."""
    return (resolve_model_dir(path) / "model.safetensors").stat().st_size


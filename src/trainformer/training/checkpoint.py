"""Checkpoints: atomic step folders, safe loading, pruning, averaging.

    checkpoints/step-000123/   model.safetensors  state.pt  config.yaml
    checkpoints/best/          model.safetensors  best.json

A checkpoint is written into `step-000123.tmp/`, flushed to disk and renamed:
a kill leaves either the old set of checkpoints or the new one, never a
half-written `step-*` folder (`.tmp` folders are ignored and cleaned up).
Loading never executes code: weights are safetensors and `state.pt` is read
with `torch.load(weights_only=True)`, so it holds only tensors, numbers,
strings, lists and dicts (`to_plain` converts numpy values).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainformer.config import Config, save_config
from trainformer.errors import UserError
from trainformer.modeldir import read_weights, write_weights

WEIGHTS = "model.safetensors"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors (`modeldir.write_weights`: tied aliases in the metadata).

    `safetensors.torch.load_model(model, path)` also reads the file (it re-ties shared weights).
    """
    write_weights(state, path, metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_weights`; tied aliases are restored."""
    state, meta = read_weights(path)
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        state[alias] = state[name]
    return state


def find_weights(path: Path) -> Path:
    """`model.safetensors` of a model/ dir, a checkpoint dir, a run dir, or the file itself."""
    from trainformer.modeldir import from_hf_if_needed

    path = from_hf_if_needed(Path(path))
    for candidate in (path, path / WEIGHTS, path / "model" / WEIGHTS):
        if candidate.is_file():
            return candidate
    raise UserError(f"init_from: no {WEIGHTS} in {path} (expected a model/ dir, a run dir or the file)")


def load_pretrained(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Fine-tuning start: copy the weights whose name and shape match; return (missing, skipped).

    A different head (e.g. MLM -> tagging) is expected, so mismatches are
    reported, not fatal.
    """
    source = load_weights(find_weights(path))
    own = model.state_dict()
    usable = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    missing = sorted(k for k in own if k not in usable)
    skipped = sorted(k for k in source if k not in usable)
    return missing, skipped


def average_checkpoints(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the weights of several checkpoints (fairseq's average_checkpoints).

    Float tensors are averaged in fp32 and cast back; integer tensors (counters,
    index buffers) are taken from the last checkpoint.
    """
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for path in paths:
        last = load_weights(find_weights(Path(path)))
        if total and last.keys() != total.keys():
            raise UserError(f"{path}: its parameter names differ from {paths[0]}; cannot average")
        for k, v in last.items():
            if v.is_floating_point():
                total[k] = total[k] + v.float() if k in total else v.float().clone()
            else:
                total[k] = v
    return {k: (v / len(paths)).to(last[k].dtype) if last[k].is_floating_point() else v
            for k, v in total.items()}


# ----------------------------------------------------------------------------
# Plain data for state.pt (weights_only loading) and RNG states
# ----------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Convert numpy values and tuples into types `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, torch.Tensor | str | bool | int | float) or obj is None:
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: {obj!r:.80}")


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device, as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"not a checkpoint folder: {path}")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / STATE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` checkpoints under `root`, oldest first (`.tmp` folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename (after fsync)."""
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def fresh_tmp_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    root: Path, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], cfg: Config
) -> Path:
    """Write `root/step-N/` atomically: weights, training state (plain data) and the config.

    Args:
        model_state: full (unsharded) weights with the model's own names.
        state: optimizer, scheduler, counters, RNG and batch-iterator states.
    """
    final = root / step_dir_name(step)
    tmp = fresh_tmp_dir(final)
    save_weights(model_state, tmp / WEIGHTS, {"step": str(step)})
    torch.save(to_plain(state), tmp / STATE)
    save_config(cfg, tmp / "config.yaml")
    publish_dir(tmp, final)
    return final


def load_state(path: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder, loaded without executing code."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors name the offending type
        raise UserError(f"{path / STATE}: unreadable training state ({e})") from None


BEST = "best"  # root/BEST/: the weights that scored best on valid


def save_best(root: Path, model_state: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write `root/best/` (weights + best.json with step and metric) atomically."""
    final = root / BEST
    tmp = fresh_tmp_dir(final)
    save_weights(model_state, tmp / WEIGHTS, {"step": str(info.get("step", ""))})
    (tmp / "best.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    publish_dir(tmp, final)
    return final


def prune_checkpoints(root: Path, keep_last: int, protect: Sequence[Path] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` step folders (never the newest, never `protect`).

    Also removes `.tmp`/`.old` leftovers of interrupted writes. Returns what was deleted.
    """
    complete = list_checkpoints(root)
    keep = set(complete[-max(1, keep_last):]) | {Path(p) for p in protect}
    removed = [p for p in complete if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    for leftover in root.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob("*.old"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed

"""Loading a `model/` directory into something that does a task's inference."""

from __future__ import annotations

from pathlib import Path

from trainformer.data.tokenizer import TextTokenizer
from trainformer.errors import UserError
from trainformer.modeldir import LoadedModel, load_model_dir
from trainformer.training.device import resolve_device


def load_for_task(model_dir: str | Path, task: str | tuple[str, ...], device: str = "auto") -> tuple[LoadedModel, TextTokenizer]:
    """Model and tokenizer of `model_dir`, checking that it was trained for `task`."""
    loaded = load_model_dir(model_dir, resolve_device(device, key="--device"))
    tasks = (task,) if isinstance(task, str) else task
    if loaded.cfg.task not in tasks:
        raise UserError(f"{loaded.path}: a {loaded.cfg.task!r} model, expected {' or '.join(map(repr, tasks))}")
    if not loaded.tokenizer_path.is_file():
        raise UserError(f"{loaded.path}: tokenizer.json is missing")
    return loaded, TextTokenizer.load(loaded.tokenizer_path)


def load_translator(model_dir: str | Path, device: str = "auto", precision: str = "auto"):
    from trainformer.tasks.translate_infer import Translator

    loaded, tokenizer = load_for_task(model_dir, "translation", device)
    return Translator(loaded.model, tokenizer, loaded.cfg, precision=precision)

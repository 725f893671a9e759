"""Tasks: what differs between jobs (data, model, loss, metric). See `base.Task`."""

from __future__ import annotations

import importlib

from trainformer.config import Config
from trainformer.errors import ConfigError
from trainformer.tasks.base import Task

# Config.task -> "module:Class"; imported lazily so a verb loads only what it uses.
TASKS = {
    "translation": "trainformer.tasks.translation:TranslationTask",
    "ner": "trainformer.tasks.tagging:TaggingTask",
    "relations": "trainformer.tasks.relations:RelationTask",
    "mlm": "trainformer.tasks.mlm:MaskedLMTask",
    "lm": "trainformer.tasks.lm:LanguageModelTask",
    "chat": "trainformer.tasks.chat:ChatTask",
}


def build_task(cfg: Config) -> Task:
    """The `Task` for `cfg.task`, constructed on `cfg` (call `setup` next)."""
    target = TASKS.get(cfg.task)
    if target is None:
        raise ConfigError(f"task: unknown task {cfg.task!r} (known: {', '.join(TASKS)})")
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"task: {cfg.task!r} is not available in this version") from None
        raise
    return getattr(module, cls_name)(cfg)

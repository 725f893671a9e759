"""Tasks: what differs between jobs (data, model, loss, metric). See `trainformer.training.task.Task`."""

from __future__ import annotations

import importlib

from trainformer.config import Config
from trainformer.errors import ConfigError
from trainformer.training.task import Task

# Config.task -> "module:Class"; imported lazily so a verb loads only what it uses.
TASKS = {
    "translation": "trainformer.tasks.translation:TranslationTask",
    "ner": "trainformer.tasks.tagging:TaggingTask",
    "relations": "trainformer.tasks.relations:RelationTask",
    "mlm": "trainformer.tasks.mlm:MaskedLMTask",
    "lm": "trainformer.tasks.lm:LanguageModelTask",
    "chat": "trainformer.tasks.chat:ChatTask",
}


def load_target(table: dict[str, str], task: str, what: str):
    """Import ``table[task]`` ("module:attr") lazily; a ConfigError naming `what` when absent."""
    target = table.get(task)
    if target is None:
        raise ConfigError(f"{what}: unknown task {task!r} (known: {', '.join(table)})")
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise ConfigError(f"{what}: {task!r} is not available in this version") from None
        raise
    return getattr(module, attr)


def build_task(cfg: Config) -> Task:
    """The `Task` for `cfg.task`, constructed on `cfg` (call `setup` next)."""
    return load_target(TASKS, cfg.task, "task")(cfg)

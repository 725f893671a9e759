"""`trainformer evaluate` for every task but translation: task -> "module:function".

Each function takes the model's resolved `Config` and the parsed CLI
arguments (`model_dir`, `data`, `device`, `bad_lines`, ...) and returns a
flat dict of metrics.
"""

from __future__ import annotations

import importlib

from trainformer.config import Config
from trainformer.errors import UserError

EVALUATORS = {
    "ner": "trainformer.tasks.tagging:evaluate_file",
    "relations": "trainformer.tasks.relations:evaluate_file",
    "mlm": "trainformer.tasks.mlm:evaluate_file",
    "lm": "trainformer.tasks.lm:evaluate_file",
    "chat": "trainformer.tasks.chat:evaluate_file",
}


def evaluate_file(cfg: Config, args) -> dict:
    target = EVALUATORS.get(cfg.task)
    if target is None:
        raise UserError(f"evaluate: no evaluator for {cfg.task!r} models")
    module_name, fn = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise UserError(f"evaluate: {cfg.task!r} models are not supported in this version") from None
        raise
    return getattr(module, fn)(cfg, args)

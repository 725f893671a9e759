"""`trainformer evaluate` for every task but translation: task -> "module:function".

Each function takes the model's resolved `Config` and the parsed CLI
arguments (`model_dir`, `data`, `device`, `bad_lines`, ...) and returns a
flat dict of metrics.
"""

from __future__ import annotations

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
    from trainformer.tasks import load_target

    return load_target(EVALUATORS, cfg.task, "evaluate", UserError)(cfg, args)

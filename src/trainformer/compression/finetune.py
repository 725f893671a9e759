"""Short fine-tuning of a pruned model with the one training loop.

The trainer is handed the already-pruned model (a structurally pruned model
cannot be built from config.json alone) and, for distillation, a loss
(`distill.Distillation`); everything else — data, loss, metric, tokenizer —
comes from the model's own task. ``init_from`` points at the
pruned model dir, so tasks that inherit a pretrained tokenizer and labels
(extraction) find them there, and the trainer's weight loading re-reads the
same pruned weights. Magnitude-pruned weights are kept at zero by masking
their gradients (`magnitude.keep_zeros`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainformer.compression.distill import Distillation
from trainformer.compression.magnitude import keep_zeros, reapply_masks
from trainformer.config import Config, apply_overrides, from_dict, load_recipe, to_dict
from trainformer.errors import UserError


def finetune_config(
    cfg: Config, init_dir: Path, steps: int, recipe: str | None = None, overrides: list[str] | None = None
) -> Config:
    """The config of a fine-tuning run of the model in `init_dir` for `steps` steps.

    Starts from `recipe` (or the model's own config), keeps the model's shape
    and tokenizer, trains `steps` steps with a short warm-up and linear decay,
    evaluates only at the end and checkpoints only at the end; `overrides`
    (``KEY=VALUE``) apply last.
    """
    base = to_dict(load_recipe(recipe)) if recipe else to_dict(cfg)
    if base["task"] != cfg.task:
        raise UserError(f"--recipe {recipe}: a {base['task']!r} recipe, but the model is a {cfg.task!r} model")
    base["model"] = to_dict(cfg.model)
    base["init_from"] = str(init_dir)
    if (init_dir / "tokenizer.json").is_file():
        base["data"]["tokenizer"]["path"] = str(init_dir / "tokenizer.json")
    base["train"].update(max_steps=steps, max_minutes=0.0, max_epochs=0, eval_every=0, ckpt_every=0,
                         ckpt_every_minutes=0.0, average_last=0, early_stopping=0)
    base["optim"].update(schedule="linear", warmup_steps=max(1, steps // 10))
    return from_dict(apply_overrides(base, list(overrides or [])))


def finetune(
    model: nn.Module,
    cfg: Config,
    init_dir: Path,
    steps: int,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
) -> dict[str, Any]:
    """Train the pruned `model` in place for `steps` steps on its task's data; returns the run summary.

    Args:
        model: the pruned model (float); it ends on the CPU, trained.
        cfg: the model's config (task, data, shape).
        init_dir: the saved pruned model dir (tokenizer, labels, weights).
        steps: optimizer steps.
        recipe / overrides: see `finetune_config`.
        run_dir: where the trainer writes its run (metrics, checkpoints); None = a
            temporary folder, deleted afterwards (it holds pickled optimizer state,
            which must not end up in a model dir).
        masks: for magnitude pruning, the non-zero masks to keep (see `magnitude.zero_masks`).
        teacher / distill: with `distill` > 0, train on the mix of the labels' cross-entropy
            and the KL divergence from `teacher` (weight `distill`; see `distill.Distillation`).
    """
    from trainformer.rundir import RunDir
    from trainformer.tasks import build_task
    from trainformer.training import distributed
    from trainformer.training.trainer import Trainer

    if steps < 1:
        raise UserError(f"--finetune-steps: expected an integer >= 1, got {steps}")
    ft_cfg = finetune_config(cfg, init_dir, steps, recipe, overrides)
    temp = run_dir is None
    path = Path(tempfile.mkdtemp(prefix="trainformer-finetune-")) if temp else Path(run_dir)
    if not temp and (path / "config.yaml").exists():
        raise UserError(f"--run-dir {path}: already holds a run; choose another folder")
    handles = keep_zeros(model, masks) if masks else []
    try:
        task = build_task(ft_cfg)
        loss = None
        if distill:
            assert teacher is not None, "distillation needs the teacher model"
            loss = Distillation(task, teacher, distill)
        trainer = Trainer(ft_cfg, task, RunDir(path), model=model, loss=loss)
        summary = trainer.fit()
    finally:
        for h in handles:
            h.remove()
        distributed.shutdown()
        if temp:
            shutil.rmtree(path, ignore_errors=True)
    model.cpu().float().eval()
    if masks:
        reapply_masks(model, masks)
    return summary

"""`trainformer train RECIPE`: train a model; `--resume RUN_DIR` continues a run."""

from __future__ import annotations

import time
from pathlib import Path

from trainformer.cli.common import add_overrides
from trainformer.config import (
    Config,
    apply_overrides,
    from_dict,
    load_recipe,
    read_yaml,
    resolve_recipe,
)
from trainformer.errors import ConfigError, UserError
from trainformer.rundir import RunDir


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model from a recipe (or continue a run)",
        description="Train a model from a built-in recipe or a YAML file. Writes config, metrics, "
        "checkpoints, the final model/ and plots into RUN_DIR.",
    )
    p.add_argument("recipe", nargs="?", help="a built-in recipe name or a .yaml path")
    add_overrides(p)
    p.add_argument("--out", type=Path, metavar="RUN_DIR",
                   help="run directory (default: runs/<recipe>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest complete checkpoint (--set still applies)")
    p.add_argument("--max-steps", type=int, metavar="N", help="shorthand for --set train.max_steps=N")
    p.set_defaults(func=run)


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return overrides


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The config of an existing run (RUN_DIR/config.yaml) with `overrides` applied."""
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml in it)")
    try:
        return from_dict(apply_overrides(read_yaml(path), overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _default_run_dir(recipe: str, cfg: Config) -> Path:
    """runs/<recipe>-<timestamp>; under torchrun rank 0 picks the time and every rank uses it."""
    from trainformer.training import distributed as D
    from trainformer.training.device import resolve_device

    name = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env = D.env_from_torchrun()
    if env.distributed:  # join the job's process group early (the trainer reuses it)
        D.init_process_group(env, cfg.parallel, resolve_device(cfg.train.device, env.local_rank))
        stamp = D.broadcast_object(stamp, env)
    return Path("runs") / f"{name}-{stamp}"


def run(args) -> int:
    overrides = _overrides(args)
    if args.resume is not None:
        if args.recipe:
            raise UserError("train: --resume reads the recipe from RUN_DIR/config.yaml; drop RECIPE")
        run_dir, cfg = args.resume, resume_config(args.resume, overrides)
    else:
        if not args.recipe:
            raise UserError("train: give a RECIPE (a built-in name or a .yaml path) or --resume RUN_DIR")
        resolve_recipe(args.recipe)
        cfg = load_recipe(args.recipe, overrides)
        run_dir = args.out or _default_run_dir(args.recipe, cfg)
        if (run_dir / "config.yaml").exists():
            raise UserError(f"--out {run_dir}: already holds a run; continue it with --resume {run_dir} "
                            "or choose another --out")
    from trainformer.tasks import build_task  # late: tasks import models and data
    from trainformer.training import distributed
    from trainformer.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, build_task(cfg), RunDir(run_dir))
        summary = trainer.fit(resume=args.resume is not None)
    finally:
        distributed.shutdown()
    if trainer.env.is_main:
        best = summary.get("best", {})
        print(f"run dir: {run_dir}  (steps {summary['steps']}, stop: {summary['stop_reason']}, "
              f"best {summary.get('main_metric')} {best.get('value')})")
    return 0

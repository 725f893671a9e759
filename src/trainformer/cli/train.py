"""`trainformer train RECIPE`: train a model; `--resume RUN_DIR` continues a run; `--seeds` trains an ensemble."""

from __future__ import annotations

import time
from pathlib import Path

from trainformer.cli.common import add_overrides
from trainformer.config import (
    Config,
    load_recipe,
    resolve_recipe,
)
from trainformer.errors import UserError
from trainformer.fit import fit_run, resume_config


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
    p.add_argument("--seeds", type=int, nargs="+", metavar="N",
                   help="ner / relations: train once per seed into RUN_DIR/seed-N, then ensemble the models "
                   "into RUN_DIR/model and score it (rerun the same command to continue after a crash)")
    p.set_defaults(func=run)


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return overrides


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
        if args.seeds:
            raise UserError("train: --seeds continues by itself; rerun the same --seeds command instead of --resume")
        run_dir, cfg = args.resume, resume_config(args.resume, overrides)
    else:
        if not args.recipe:
            raise UserError("train: give a RECIPE (a built-in name or a .yaml path) or --resume RUN_DIR")
        resolve_recipe(args.recipe)
        cfg = load_recipe(args.recipe, overrides)
        run_dir = args.out or _default_run_dir(args.recipe, cfg)
        if args.seeds:
            return _run_seeds(args, overrides, run_dir)
        if (run_dir / "config.yaml").exists():
            raise UserError(f"--out {run_dir}: already holds a run; continue it with --resume {run_dir} "
                            "or choose another --out")
    fit_run(cfg, run_dir, resume=args.resume is not None)
    return 0


def _run_seeds(args, overrides: list[str], out: Path) -> int:
    from trainformer.fit import train_seeds
    from trainformer.training import distributed as D

    if D.env_from_torchrun().distributed:
        raise UserError("train: --seeds trains the seeds one after another in one process; run it without torchrun")
    summary = train_seeds(args.recipe, overrides, args.seeds, out)
    metric = summary["main_metric"]
    for seed, scores in summary["members"].items():
        print(f"seed {seed}: " + "  ".join(f"{split} {s.get(metric)}" for split, s in scores.items()))
    print(f"ensemble of {len(args.seeds)} seeds: " + "  ".join(
        f"{split} {summary[split].get(metric)}" for split in ("valid", "test") if split in summary))
    print(f"model dir: {out / 'model'} (`trainformer evaluate` and `extract` take it); scores in {out / 'summary.json'}")
    return 0

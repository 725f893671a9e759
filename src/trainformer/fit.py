"""Running recipes: one run (`fit_run`, `resume_config`), or one per seed and their ensemble (`train_seeds`).

`trainformer train` is a thin verb over this module.

`trainformer train RECIPE --seeds 0 2 3 --out DIR`: one recipe, several seeds, one ensemble.

Extraction models trained from random weights on a few thousand sentences
differ from seed to seed in what they get wrong, so their vote
(`trainformer.inference.ensemble`) beats each of them. This runs the whole procedure
as one command:

    DIR/
      seeds.json     the recipe, the --set overrides and the seeds (a rerun must give the same)
      seed-N/        a full run directory per seed, trained with train.seed=N
      model/         the ensemble of the seeds' models, which `evaluate` and `extract` take
      summary.json   each seed's valid and test scores, and the ensemble's

Nothing is lost when it dies: rerunning the same command keeps the seeds
that finished, resumes an interrupted one from its newest checkpoint and
starts the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trainformer.config import Config, apply_overrides, from_dict, load_recipe, read_yaml
from trainformer.errors import ConfigError, UserError
from trainformer.rundir import RunDir, atomic_write_text

REQUEST = "seeds.json"
SPLITS = ("valid", "test")


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


def fit_run(cfg: Config, run_dir: Path, resume: bool) -> dict:
    """Train (or continue) one run; the main process prints where it went. Returns its summary."""
    from trainformer.tasks import build_task  # late: tasks import models and data
    from trainformer.training import distributed
    from trainformer.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, build_task(cfg), RunDir(run_dir))
        summary = trainer.fit(resume=resume)
    finally:
        distributed.shutdown()
    if trainer.env.is_main:
        best = summary.get("best", {})
        print(f"run dir: {run_dir}  (steps {summary['steps']}, stop: {summary['stop_reason']}, "
              f"best {summary.get('main_metric')} {best.get('value')})")
    return summary


def check_seeds(seeds: list[int], overrides: list[str]) -> None:
    if len(seeds) < 2:
        raise UserError(f"--seeds: give two or more seeds to ensemble, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: each seed once, got {' '.join(map(str, seeds))}")
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
        raise UserError("--seeds sets train.seed for each run; drop --set train.seed")


def train_seeds(recipe: str, overrides: list[str], seeds: list[int], out: Path) -> dict[str, Any]:
    """Train `recipe` once per seed under `out`, ensemble the models, score it; returns the summary."""
    from trainformer.inference.ensemble import ENSEMBLE_TASKS

    check_seeds(seeds, overrides)
    configs = {seed: load_recipe(recipe, [*overrides, f"train.seed={seed}"]) for seed in seeds}  # fail before writing
    task = configs[seeds[0]].task
    if task not in ENSEMBLE_TASKS:
        raise UserError(f"--seeds: {recipe} is a {task!r} recipe; ensembles combine "
                        f"{' or '.join(map(repr, ENSEMBLE_TASKS))} models")
    _claim(out, {"recipe": recipe, "overrides": overrides, "seeds": seeds})
    runs = [out / f"seed-{seed}" for seed in seeds]
    members = {seed: _train_one(configs[seed], seed, run) for seed, run in zip(seeds, runs)}
    model_dir = _rebuild_ensemble(runs, out / "model")
    first = resume_config(runs[0], [])
    first.data.tokenizer.path = str(runs[0] / "model" / "tokenizer.json")  # the members' own; none is trained
    scores = score_model_dir(first, model_dir)
    summary = {
        "recipe": recipe, "task": first.task, "seeds": seeds, "main_metric": members[seeds[0]].get("main_metric"),
        "members": {str(seed): {split: s.get(split, {}) for split in SPLITS} for seed, s in members.items()},
        **scores,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _claim(out: Path, request: dict[str, Any]) -> None:
    """Make `out` this request's directory: new, or holding the same request from an earlier try."""
    path = out / REQUEST
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e}); choose another --out") from None
        if before != request:
            raise UserError(f"--out {out}: holds `train {before.get('recipe')} --seeds "
                            f"{' '.join(map(str, before.get('seeds', [])))}` with --set "
                            f"{before.get('overrides')}; rerun that to continue it, or choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists, is not empty and holds no --seeds run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(request, indent=2) + "\n")


def _train_one(cfg: Config, seed: int, run_dir: Path) -> dict[str, Any]:
    """The summary of seed `seed`'s run (config `cfg`): read when it finished earlier, else trained
    (or resumed from the config saved in `run_dir`)."""

    done = run_dir / "summary.json"
    if done.is_file():
        print(f"seed {seed}: finished earlier, kept ({run_dir})")
        return json.loads(done.read_text(encoding="utf-8"))
    if (run_dir / "config.yaml").is_file():
        print(f"seed {seed}: resuming {run_dir}")
        return fit_run(resume_config(run_dir, []), run_dir, True)
    print(f"seed {seed}: training into {run_dir}")
    return fit_run(cfg, run_dir, False)


def _rebuild_ensemble(runs: list[Path], model_dir: Path) -> Path:
    """The ensemble of the runs' models at `model_dir`, built beside it and swapped in (it is
    derived from the runs, so an older one is replaced)."""
    from trainformer.inference.ensemble import build_ensemble

    fresh = model_dir.with_name(model_dir.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    build_ensemble(runs, fresh)
    shutil.rmtree(model_dir, ignore_errors=True)
    fresh.rename(model_dir)
    return model_dir


def score_model_dir(cfg: Config, model_dir: Path) -> dict[str, dict[str, float]]:
    """The scores of the model (or ensemble) at `model_dir` on the valid and test splits of
    `cfg`'s data, split as in training."""
    from trainformer.tasks import build_task

    task = build_task(cfg)
    task.setup(None)
    return {split: task.evaluate_model_dir(model_dir, split) for split in SPLITS if task.has_split(split)}

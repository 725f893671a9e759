"""Ensembles of extraction models: several trained models that vote as one.

Relation classifiers and taggers trained from random weights on a few
thousand sentences differ from seed to seed in what they get wrong, so
their combined vote is more accurate than any one of them. A relation
ensemble averages the members' label distributions; a NER ensemble
averages their per-word log-probabilities and their tag-transition scores,
so Viterbi finds the path of highest mean score. An ensemble is a model
directory of its own, so `evaluate` and `extract` take it like any other:

    ENSEMBLE/
      ensemble.json     {"task": "relations", "members": ["member-0", ...], "sources": [...]}
      config.json       member 0's, so every verb sees the task
      tokenizer.json    shared: every member must have the same file
      labels.json       shared: every member must have the same labels
      member-0/ ...     a full copy of each member's model directory

Translation and chat models are not combined (their decoding would need
the members stepped together). Loading the members: `loading.load_members`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainformer.errors import UserError
from trainformer.modeldir import ENSEMBLE_MANIFEST as MANIFEST
from trainformer.modeldir import read_model_config, resolve_model_dir

SHARED = ("config.json", "tokenizer.json", "labels.json")
ENSEMBLE_TASKS = ("relations", "ner")


def is_ensemble(path: str | Path) -> bool:
    p = Path(path)
    return (p / MANIFEST).is_file() or (p / "model" / MANIFEST).is_file()


def member_dirs(path: str | Path) -> list[Path]:
    """The member model directories of the ensemble at `path`."""
    p = resolve_model_dir(path)
    try:
        manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        members = [p / m for m in manifest["members"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{p / MANIFEST}: unreadable ensemble manifest ({e})") from None
    for m in members:
        if not (m / "config.json").is_file():
            raise UserError(f"{p / MANIFEST}: member {m.name} is missing from {p}")
    return members


def build_ensemble(model_dirs: list[str | Path], out: str | Path) -> Path:
    """Copy the member model dirs into a new ensemble directory `out`; returns it."""
    if len(model_dirs) < 2:
        raise UserError(f"ensemble: expected two or more model directories, got {len(model_dirs)}")
    dirs = [resolve_model_dir(d) for d in model_dirs]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty; choose a new folder")
    first, kind = dirs[0], read_model_config(dirs[0]).task
    for d in dirs:
        if is_ensemble(d):
            raise UserError(f"{d}: already an ensemble; list its members instead")
        task = read_model_config(d).task
        if task != kind:
            raise UserError(f"{d}: a {task!r} model, but {first} is a {kind!r} one")
        if task not in ENSEMBLE_TASKS:
            raise UserError(f"{d}: a {task!r} model; ensembles combine {' or '.join(map(repr, ENSEMBLE_TASKS))} models")
        for name in ("tokenizer.json", "labels.json"):
            if not (d / name).is_file():
                raise UserError(f"{d}: {name} is missing")
            if (d / name).read_bytes() != (first / name).read_bytes():
                raise UserError(f"{d}: its {name} differs from {first}'s; members must share "
                                "one tokenizer and one label set (train them with the same data keys)")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, d in enumerate(dirs):
        name = f"member-{i}"
        shutil.copytree(d, out / name)
        names.append(name)
    for name in SHARED:
        shutil.copyfile(first / name, out / name)
    manifest = {"task": kind, "members": names, "sources": [str(d) for d in dirs]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out

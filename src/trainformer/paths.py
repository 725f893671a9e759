"""Where data, caches and runs live.

Datasets are looked up by name under, in order: ``$TRAINFORMER_DATA``, the
``shared/data`` folder beside the repository (``../shared/data`` from the
repository root), and ``~/.cache/trainformer/data``. Caches (tokenizers,
pre-tokenised arrays) go to ``$TRAINFORMER_CACHE`` or
``~/.cache/trainformer`` and never into the data root, which may be read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainformer.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/trainformer/paths.py -> repository root


def data_roots() -> list[Path]:
    """Candidate data roots, most specific first."""
    roots = []
    env = os.environ.get("TRAINFORMER_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(REPO_ROOT.parent / "shared" / "data")
    roots.append(Path.home() / ".cache" / "trainformer" / "data")
    return roots


def find_data(relpath: str | Path, what: str = "dataset") -> Path:
    """The first existing ``ROOT/relpath``; a DataError listing every place looked otherwise."""
    rel = Path(relpath)
    if rel.is_absolute():
        if rel.exists():
            return rel
        raise DataError(f"{what} not found: {rel}")
    looked = []
    for root in data_roots():
        candidate = root / rel
        if candidate.exists():
            return candidate
        looked.append(str(candidate))
    raise DataError(
        f"{what} not found: expected file {rel} under a data root; looked in "
        + ", ".join(looked)
        + " (set TRAINFORMER_DATA to the folder that holds it)"
    )


def cache_dir(*parts: str) -> Path:
    """A writable cache folder (created): ``$TRAINFORMER_CACHE`` or ``~/.cache/trainformer``."""
    base = Path(os.environ.get("TRAINFORMER_CACHE") or Path.home() / ".cache" / "trainformer")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Named datasets -> files under the data root, and reading them by format.

`DataConfig.dataset` is a name from `DATASETS` or a path. A name maps each
of its official splits to a file found with `trainformer.paths.find_data`
(which lists every place it looked when the file is missing). A path is one
file read with `DataConfig.format`, or the reader its suffix implies;
``parallel`` takes a prefix and reads ``PREFIX.<src_lang>`` and
``PREFIX.<tgt_lang>``. Data sets without official splits come back as
``{"train": ...}``; make valid/test with `trainformer.data.splits`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainformer.config import DataConfig
from trainformer.data import readers
from trainformer.errors import ConfigError
from trainformer.paths import find_data

FORMATS = ("tsv", "parallel", "jsonl", "conll", "semeval", "dailydialog", "text")
_SUFFIX_FORMAT = {".tsv": "tsv", ".jsonl": "jsonl", ".conll": "conll", ".txt": "text"}


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its reader and one file per official split (paths under a data root)."""

    format: str
    files: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)  # extra reader arguments


def _dailydialog() -> dict[str, str]:
    return {
        s: f"dialogue/dailydialog/{d}/dialogues_{d}.txt"
        for s, d in (("train", "train"), ("valid", "validation"), ("test", "test"))
    }


DATASETS: dict[str, DatasetSpec] = {
    "tatoeba-en-fr": DatasetSpec("tsv", {"train": "en-fr/tatoeba.tsv"}),
    "conll2003": DatasetSpec(
        "conll", {s: f"ner/conll2003/{s}.txt" for s in ("train", "valid", "test")}
    ),
    "wnut17": DatasetSpec(
        "conll",
        {
            "train": "ner/wnut17/train.conll",
            "valid": "ner/wnut17/dev.conll",
            "test": "ner/wnut17/test.conll",
        },
    ),
    "semeval2010": DatasetSpec(
        "semeval",
        {
            "train": "relations/semeval2010_task8/train.tsv",
            "test": "relations/semeval2010_task8/test.tsv",
        },
    ),
    "dailydialog": DatasetSpec("dailydialog", _dailydialog()),
    # speeches are separated by blank lines
    "tinyshakespeare": DatasetSpec(
        "text", {"train": "lm/tinyshakespeare/input.txt"}, {"doc_sep": "blank_line"}
    ),
    # stories are one per line (their paragraphs are split by blank lines, so a
    # story's paragraphs become separate documents; the file keeps no end marker)
    "tinystories": DatasetSpec(
        "text",
        {"train": "lm/tinystories/tinystories_train_prefix_lowercased.txt"},
        {"doc_sep": "line"},
    ),
}


def _format_of(path: Path, cfg: DataConfig) -> str:
    fmt = cfg.format or _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"data.format: cannot tell the format of {path} from its suffix; expected one of {', '.join(FORMATS)}"
        )
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"data.format: expected one of {', '.join(FORMATS)}, got {fmt!r}{hint}")
    return fmt


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or Path(name).suffix != "" or Path(name).exists()


def resolve_dataset(cfg: DataConfig) -> tuple[str, dict[str, Path]]:
    """(format, split -> file) for `cfg.dataset` (a name or a path).

    For ``parallel`` the file is the prefix (``corpus`` for ``corpus.en``/``corpus.fr``).
    """
    spec = DATASETS.get(cfg.dataset)
    if spec is not None:
        files = {
            split: find_data(rel, f"{cfg.dataset} {split} file")
            for split, rel in spec.files.items()
        }
        return spec.format, files
    if not _looks_like_path(cfg.dataset):
        close = difflib.get_close_matches(cfg.dataset, list(DATASETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"data.dataset: no dataset named {cfg.dataset!r}; {hint}"
            f"expected one of {', '.join(DATASETS)} or a file path"
        )
    path = Path(cfg.dataset).expanduser()
    fmt = _format_of(path, cfg)
    if fmt == "parallel":
        for lang in (cfg.src_lang, cfg.tgt_lang):
            find_data(path.parent / f"{path.name}.{lang}", "parallel text file")
        return fmt, {"train": path}
    return fmt, {"train": find_data(path, "data file")}


def read_file(fmt: str, path: Path, cfg: DataConfig, **options: Any) -> readers.ReadResult[Any]:
    """Read one file with the reader for `fmt` under `cfg.bad_lines`."""
    policy = cfg.bad_lines
    if fmt == "tsv":
        return readers.read_parallel_tsv(path, cfg.src_lang, cfg.tgt_lang, policy)
    if fmt == "parallel":
        src = path.parent / f"{path.name}.{cfg.src_lang}"
        tgt = path.parent / f"{path.name}.{cfg.tgt_lang}"
        return readers.read_aligned(find_data(src), find_data(tgt), policy)
    if fmt == "jsonl":
        return readers.read_jsonl(path, cfg.src_lang, cfg.tgt_lang, policy)
    if fmt == "conll":
        return readers.read_conll(path, policy)
    if fmt == "semeval":
        return readers.read_semeval(path, policy)
    if fmt == "dailydialog":
        return readers.read_dailydialog(path, policy)
    if fmt == "text":
        return readers.read_text(path, options.get("doc_sep", "blank_line"), policy)
    raise ConfigError(f"data.format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def read_dataset(cfg: DataConfig) -> dict[str, readers.ReadResult[Any]]:
    """Read every official split of `cfg.dataset`: split name -> examples and bad-line report."""
    fmt, files = resolve_dataset(cfg)
    spec = DATASETS.get(cfg.dataset)
    options = spec.options if spec is not None else {}
    return {split: read_file(fmt, path, cfg, **options) for split, path in files.items()}


PAIR_FORMATS = ("tsv", "parallel", "jsonl")


def read_translation_pairs(cfg: DataConfig) -> tuple[readers.ReadResult[readers.Pair], Path]:
    """Sentence pairs of a translation dataset and the file they came from.

    The dataset must have a pair format (tsv, parallel, jsonl); its ``train``
    file is read (valid/test are made with `trainformer.data.splits`). For
    ``parallel`` the file returned is the source-language one.
    """
    fmt, files = resolve_dataset(cfg)
    if fmt not in PAIR_FORMATS:
        raise ConfigError(
            f"data.dataset: {cfg.dataset!r} is {fmt} data; translation expects "
            f"sentence pairs ({', '.join(PAIR_FORMATS)})"
        )
    result = read_file(fmt, files["train"], cfg)
    return result, result.path

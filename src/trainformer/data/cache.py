"""Pre-tokenised data on disk: tokenise once, memory-map afterwards.

A `TokenStore` holds named ragged int32 arrays (one per field: ``src``,
``tgt``, ``ids``, ``word_ids``...): a flat token array and an (N+1,) offsets
array each, saved as ``.npy`` and loaded with ``np.load(mmap_mode="r")``, so
a second run starts in milliseconds. The cache folder is named by a hash of
the data (a file's content hash or the rows themselves), the tokenizer's JSON
and the field names; it is written under a temporary name and renamed, so a
crashed or concurrent writer never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainformer.data.tokenizer import TextTokenizer
from trainformer.paths import cache_dir

_CACHE_VERSION = "1"  # bump when the layout changes


@dataclass
class Ragged:
    """N int32 sequences stored flat: sequence i is ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (N+1,) int64, offsets[0] == 0

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = itertools.chain.from_iterable(seqs)
        values = np.fromiter(flat, dtype=np.int32, count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """(N,) int64 length of every sequence."""
        return np.diff(self.offsets)

    def take(self, indices: Iterable[int]) -> list[np.ndarray]:
        return [self[int(i)] for i in indices]

    def to_lists(self) -> list[list[int]]:
        return [self[i].tolist() for i in range(len(self))]


class TokenStore:
    """Aligned ragged fields of one data split (all fields have the same N)."""

    def __init__(self, fields: dict[str, Ragged], path: Path | None = None):
        sizes = {len(r) for r in fields.values()}
        if len(sizes) > 1:
            raise ValueError(f"fields differ in length: { {k: len(v) for k, v in fields.items()} }")
        self.fields = fields
        self.path = path  # the cache folder it was loaded from, if any

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()))) if self.fields else 0

    def __getitem__(self, name: str) -> Ragged:
        return self.fields[name]

    def lengths(self, *names: str) -> np.ndarray:
        """(N,) lengths of one field, or (N, F) of several (for batching)."""
        cols = [self.fields[n].lengths() for n in names or list(self.fields)]
        return cols[0] if len(cols) == 1 else np.stack(cols, axis=1)

    def take(self, indices: Iterable[int]) -> dict[str, list[np.ndarray]]:
        """The rows at `indices`, field by field."""
        idx = list(indices)
        return {name: r.take(idx) for name, r in self.fields.items()}

    def save(self, folder: Path) -> None:
        """Write every field as ``NAME.values.npy`` and ``NAME.offsets.npy`` plus ``meta.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, r in self.fields.items():
            np.save(folder / f"{name}.values.npy", r.values)
            np.save(folder / f"{name}.offsets.npy", r.offsets)
        meta = {"fields": list(self.fields), "n": len(self), "version": _CACHE_VERSION}
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> TokenStore:
        """Memory-map a store written by `save`."""
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        fields = {
            name: Ragged(
                np.load(folder / f"{name}.values.npy", mmap_mode="r"),
                np.load(folder / f"{name}.offsets.npy", mmap_mode="r"),
            )
            for name in meta["fields"]
        }
        return cls(fields, path=folder)


# ----------------------------------------------------------------------------
# Hashes for cache keys
# ----------------------------------------------------------------------------


def file_hash(path: Path | str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def texts_hash(*columns: Iterable[str]) -> str:
    """sha256 of text columns (each text followed by a NUL, each column by a record separator)."""
    h = hashlib.sha256()
    for col in columns:
        for text in col:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        h.update(b"\x1e")
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Cached building
# ----------------------------------------------------------------------------


def cached_store(
    key: str, build: Callable[[], dict[str, Ragged]], subdir: str = "tokenized"
) -> TokenStore:
    """Load the store cached under `key`, or build, save (atomically) and load it.

    Args:
        key: names the cache folder; must change whenever the content would.
        build: makes the fields when the cache is missing.
    """
    root = cache_dir(subdir)
    final = root / key
    if (final / "meta.json").is_file():
        return TokenStore.load(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        TokenStore(build()).save(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore.load(final)


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join((_CACHE_VERSION, *parts)).encode("utf-8")).hexdigest()[:32]


def tokenize_cached(
    columns: dict[str, Sequence[str]], tokenizer: TextTokenizer, data_key: str | None = None
) -> TokenStore:
    """Token ids of text columns (e.g. ``{"src": [...], "tgt": [...]}``), cached on disk.

    Args:
        columns: field name -> N texts.
        tokenizer: encodes with its batch encoder; its JSON is part of the key.
        data_key: identifies the texts (e.g. the data file's hash plus the split
            name); by default a hash of the texts themselves.
    Returns:
        A memory-mapped `TokenStore` with one ragged field per column.
    """
    data_key = data_key or texts_hash(*columns.values())
    key = _key("text", data_key, tokenizer.fingerprint(), *columns)
    return cached_store(
        key,
        lambda: {n: Ragged.from_lists(tokenizer.encode_batch(list(t))) for n, t in columns.items()},
    )


def tokenize_words_cached(
    sentences: Sequence[Sequence[str]], tokenizer: TextTokenizer, data_key: str | None = None
) -> TokenStore:
    """Subword ids of pre-split sentences (tagging), cached: fields ``ids`` and ``word_ids``.

    ``word_ids[i][j]`` is the index of the word that subword j of sentence i came from.
    """
    data_key = data_key or texts_hash("\t".join(s) for s in sentences)
    key = _key("words", data_key, tokenizer.fingerprint())

    def build() -> dict[str, Ragged]:
        encs = tokenizer.encode_words_batch([list(s) for s in sentences])
        return {
            "ids": Ragged.from_lists([ids for ids, _ in encs]),
            "word_ids": Ragged.from_lists([w for _, w in encs]),
        }

    return cached_store(key, build)

"""Leak-free, deterministic train/valid/test splits.

Rows are grouped by a key (for translation, the source sentence: Tatoeba
repeats 52k English sentences with other translations) and whole groups are
assigned to splits, so no key appears in two splits. A group's split depends
only on the seed and its key — a keyed hash, not the file order — so the
assignment is stable when rows are reordered or appended. Exact duplicate
rows are removed first and counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainformer.errors import ConfigError

SPLITS = ("train", "valid", "test")


@dataclass
class Splits:
    """Row indices (into the rows given to `make_splits`) of each split, in file order."""

    train: np.ndarray  # (N_train,) int64
    valid: np.ndarray  # (N_valid,) int64
    test: np.ndarray  # (N_test,) int64
    group_rule: str
    seed: int
    n_rows: int
    n_groups: int
    n_duplicates: int
    group_counts: dict[str, int]

    def __getitem__(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, split)

    def report(self) -> dict[str, Any]:
        """Plain data to print and save beside a run."""
        return {
            "rows": self.n_rows,
            "duplicates_removed": self.n_duplicates,
            "groups": self.n_groups,
            "group_rule": self.group_rule,
            "seed": self.seed,
            "sizes": {s: int(len(self[s])) for s in SPLITS},
            "groups_per_split": dict(self.group_counts),
        }


def _n_groups(size: float, n: int, key: str) -> int:
    """A fraction (< 1) or a count (>= 1) of `n` groups."""
    if size < 0:
        raise ConfigError(f"{key}: expected a fraction < 1 or a count >= 1, got {size}")
    return int(round(size * n)) if size < 1 else int(size)


def _group_rank(keys: Sequence[str], seed: int) -> np.ndarray:
    """(G,) a seed-dependent pseudo-random sort key for each group key."""
    salt = seed.to_bytes(8, "little", signed=True)
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(k.encode("utf-8"), digest_size=8, key=salt).digest(), "little"
            )
            for k in keys
        ),
        dtype=np.uint64,
        count=len(keys),
    )


def dedup(rows: Sequence[Hashable]) -> np.ndarray:
    """(K,) indices of the first occurrence of each distinct row, in order."""
    first: dict[Hashable, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row, i)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def make_splits(
    rows: Sequence[Hashable],
    keys: Sequence[str],
    valid_size: float,
    test_size: float,
    seed: int,
    group_rule: str = "source sentence",
) -> Splits:
    """Split rows into train/valid/test by group, deterministically.

    Args:
        rows: (N,) hashable rows; exact duplicates are removed (first kept).
        keys: (N,) the group key of each row; rows with one key share a split.
        valid_size, test_size: fraction (< 1) or count (>= 1) of groups.
        seed: changes the assignment; the same seed and keys give the same splits.
        group_rule: a description of the key, for the report.
    """
    if len(rows) != len(keys):
        raise ValueError(f"rows and keys differ in length: {len(rows)} vs {len(keys)}")
    kept = dedup(rows)
    group_of: dict[str, int] = {}
    gid = np.fromiter(
        (group_of.setdefault(keys[i], len(group_of)) for i in kept), np.int64, len(kept)
    )
    n_groups = len(group_of)
    n_valid = _n_groups(valid_size, n_groups, "data.valid_size")
    n_test = _n_groups(test_size, n_groups, "data.test_size")
    if n_valid + n_test >= n_groups:
        raise ConfigError(
            f"data.valid_size + data.test_size: {n_valid} + {n_test} groups leave none of "
            f"{n_groups} for training; expected smaller sizes"
        )
    order = np.argsort(_group_rank(list(group_of), seed), kind="stable")  # (G,) groups, shuffled
    split_of_group = np.zeros(n_groups, dtype=np.int8)  # 0 train, 1 valid, 2 test
    split_of_group[order[:n_test]] = 2
    split_of_group[order[n_test : n_test + n_valid]] = 1
    split_of_row = split_of_group[gid]  # (K,)
    return Splits(
        train=kept[split_of_row == 0],
        valid=kept[split_of_row == 1],
        test=kept[split_of_row == 2],
        group_rule=group_rule,
        seed=seed,
        n_rows=len(rows),
        n_groups=n_groups,
        n_duplicates=len(rows) - len(kept),
        group_counts={"train": n_groups - n_valid - n_test, "valid": n_valid, "test": n_test},
    )


def group_references(
    sources: Sequence[str], targets: Sequence[str], indices: Sequence[int] | np.ndarray
) -> list[tuple[str, list[str]]]:
    """Multi-reference evaluation data: each distinct source of a split with all its targets.

    Args:
        sources, targets: (N,) aligned texts of the whole data set.
        indices: the rows of one split (e.g. `Splits.test`).
    Returns:
        [(source, [reference, ...]), ...] in order of first appearance; every
        reference is kept, in file order.
    """
    refs: dict[str, list[str]] = {}
    for i in indices:
        refs.setdefault(sources[i], []).append(targets[i])
    return list(refs.items())


def drop_overlap(eval_keys: Sequence[str], train_keys: Sequence[str]) -> np.ndarray:
    """(K,) indices of `eval_keys` that do not occur in `train_keys`.

    For data sets with official splits that overlap (DailyDialog repeats 106
    test dialogues in train): evaluate only on the unseen ones.
    """
    seen = set(train_keys)
    return np.array([i for i, k in enumerate(eval_keys) if k not in seen], dtype=np.int64)

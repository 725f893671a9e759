"""Splits: no group leaks across splits, duplicates removed, deterministic, sized as asked."""

import numpy as np
import pytest

from trainformer.data.splits import SPLITS, drop_overlap, group_references, make_splits
from trainformer.errors import ConfigError


def pairs_with_repeats(n_sources: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """Sources with 1-4 translations each, shuffled, plus exact duplicate rows."""
    rng = np.random.default_rng(seed)
    rows = [
        (f"src {i}", f"tgt {i}.{j}") for i in range(n_sources) for j in range(rng.integers(1, 5))
    ]
    rows += [rows[k] for k in rng.integers(0, len(rows), size=40)]  # exact duplicates
    return [rows[k] for k in rng.permutation(len(rows))]


def split_of(rows, s) -> dict[str, set[str]]:
    return {name: {rows[i][0] for i in s[name]} for name in SPLITS}


def test_no_source_in_two_splits_and_every_row_once():
    rows = pairs_with_repeats()
    s = make_splits(rows, [r[0] for r in rows], 0.1, 0.1, seed=1)
    srcs = split_of(rows, s)
    assert not srcs["train"] & srcs["valid"]
    assert not srcs["train"] & srcs["test"]
    assert not srcs["valid"] & srcs["test"]
    used = np.concatenate([s.train, s.valid, s.test])
    assert len(used) == len(set(used.tolist()))  # no row twice
    assert {rows[i] for i in used} == set(rows)  # every distinct row once
    assert s.n_duplicates == len(rows) - len(set(rows)) > 0
    assert all(np.all(np.diff(s[n]) > 0) for n in SPLITS)  # file order kept


def test_every_translation_of_a_source_goes_with_it():
    rows = pairs_with_repeats()
    s = make_splits(rows, [r[0] for r in rows], 0.1, 0.1, seed=1)
    for name in SPLITS:
        srcs = {rows[i][0] for i in s[name]}
        expected = {r for r in rows if r[0] in srcs}
        assert {rows[i] for i in s[name]} == expected


def test_sizes_are_counted_in_groups():
    rows = pairs_with_repeats(n_sources=200)
    s = make_splits(rows, [r[0] for r in rows], 0.1, 25, seed=3)
    assert len(split_of(rows, s)["valid"]) == 20  # 10% of 200 sources
    assert len(split_of(rows, s)["test"]) == 25  # a count
    report = s.report()
    assert report["groups"] == 200 and report["groups_per_split"] == {
        "train": 155,
        "valid": 20,
        "test": 25,
    }
    assert report["duplicates_removed"] == s.n_duplicates
    assert sum(report["sizes"].values()) == len(set(rows))


def test_deterministic_for_a_seed_and_independent_of_row_order():
    rows = pairs_with_repeats()
    keys = [r[0] for r in rows]
    a = make_splits(rows, keys, 0.1, 0.1, seed=7)
    b = make_splits(rows, keys, 0.1, 0.1, seed=7)
    assert all(np.array_equal(a[n], b[n]) for n in SPLITS)
    shuffled = rows[::-1]
    c = make_splits(shuffled, [r[0] for r in shuffled], 0.1, 0.1, seed=7)
    assert split_of(shuffled, c) == split_of(rows, a)  # same sources in the same splits
    d = make_splits(rows, keys, 0.1, 0.1, seed=8)
    assert split_of(rows, d)["test"] != split_of(rows, a)["test"]


def test_sizes_that_leave_no_training_data_are_rejected():
    rows = [(f"s{i}", "t") for i in range(10)]
    with pytest.raises(ConfigError, match="data.valid_size \\+ data.test_size"):
        make_splits(rows, [r[0] for r in rows], 5, 5, seed=0)


def test_group_references_keeps_every_reference():
    src = ["a", "b", "a", "c", "a"]
    tgt = ["x1", "y", "x2", "z", "x3"]
    assert group_references(src, tgt, [0, 2, 3, 4]) == [("a", ["x1", "x2", "x3"]), ("c", ["z"])]


def test_drop_overlap():
    assert drop_overlap(["p", "q", "r", "q"], ["q", "s"]).tolist() == [0, 2]


@pytest.mark.data
def test_real_tatoeba_split_has_no_leak():
    from trainformer.config import DataConfig
    from trainformer.data.registry import read_translation_pairs
    from trainformer.errors import DataError

    try:
        result, _ = read_translation_pairs(DataConfig())
    except DataError:
        pytest.skip("shared Tatoeba data absent")
    rows = [(p.src, p.tgt) for p in result.examples]
    s = make_splits(rows, [r[0] for r in rows], 0.02, 0.02, seed=1234)
    srcs = split_of(rows, s)
    assert not (srcs["train"] & srcs["test"]) and not (srcs["train"] & srcs["valid"])
    assert s.n_duplicates == 0 and s.n_groups == len({r[0] for r in rows})
    assert sum(len(s[n]) for n in SPLITS) == 172_461


def test_spread_indices_cover_the_split_evenly():
    from trainformer.training.task import spread_indices

    assert spread_indices(10, 0) == list(range(10)) and spread_indices(3, 5) == [0, 1, 2]
    idx = spread_indices(2419, 500)
    assert len(idx) == len(set(idx)) == 500 and idx[0] == 0 and idx[-1] == 2418
    assert max(b - a for a, b in zip(idx, idx[1:])) <= 5  # no long stretch skipped (not the first 500)
    assert spread_indices(7, 1) == [0]

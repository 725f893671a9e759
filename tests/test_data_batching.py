"""Token-budget batches: budgets, padding, sharding, exact resume, collate."""

import itertools

import numpy as np
import pytest
import torch

from trainformer.data.batching import (
    IGNORE_INDEX,
    PairBatches,
    StoreBatches,
    TokenBudgetSampler,
    collate_pairs,
    collate_tagging,
    pad_to_array,
    padding_fraction,
    pair_collate,
    random_batches,
)
from trainformer.data.cache import Ragged, TokenStore
from trainformer.errors import DataError


def random_lengths(n: int = 500, seed: int = 0) -> np.ndarray:
    """(n, 2) correlated source/target lengths, like a translation corpus."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 40, size=n)
    tgt = np.clip(src + rng.integers(-5, 6, size=n), 2, None)
    return np.stack([src, tgt], axis=1)


def padded_size(batch: np.ndarray, lengths: np.ndarray) -> int:
    return len(batch) * int(lengths[batch].max())


def take(it, n: int) -> list[np.ndarray]:
    return [b.copy() for b in itertools.islice(it, n)]


def test_every_batch_fits_the_budget_and_every_example_is_used_once():
    lengths = random_lengths()
    sampler = TokenBudgetSampler(lengths, max_tokens=256, seed=0)
    batches = sampler.epoch_batches(0)
    assert all(padded_size(b, lengths) <= 256 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    # length sorting pays: far less padding than random batches with the same mean size
    mean_size = round(len(lengths) / len(batches))
    assert padding_fraction(batches, lengths) < 0.5 * padding_fraction(
        random_batches(len(lengths), mean_size), lengths
    )


def test_sort_window_keeps_budget_and_coverage():
    lengths = random_lengths()
    batches = TokenBudgetSampler(lengths, 256, seed=0, sort_window=100).epoch_batches(0)
    assert all(padded_size(b, lengths) <= 256 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))


def test_an_example_over_budget_forms_a_batch_of_one():
    lengths = np.array([5, 5, 300, 5, 5])
    batches = TokenBudgetSampler(lengths, max_tokens=20, seed=0).epoch_batches(0)
    assert [2] in [b.tolist() for b in batches]
    assert all(padded_size(b, lengths) <= 20 for b in batches if 2 not in b)


def test_padding_fraction_by_hand():
    lengths = np.array([[3, 2], [1, 2], [4, 4]])
    # src: batch [0,1] pads to 2x3=6 (4 real), batch [2] 4 (4 real); tgt: 4 (4 real), 4 (4 real)
    assert padding_fraction([np.array([0, 1]), np.array([2])], lengths) == pytest.approx(2 / 18)
    assert padding_fraction([np.array([0, 1, 2])], np.array([1, 2, 3])) == pytest.approx(3 / 9)


def test_epochs_are_deterministic_and_reshuffled():
    lengths = random_lengths()
    a = TokenBudgetSampler(lengths, 256, seed=5)
    b = TokenBudgetSampler(lengths, 256, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(0), b.epoch_batches(0)))
    e0 = [x.tolist() for x in a.epoch_batches(0)]
    assert [x.tolist() for x in a.epoch_batches(1)] != e0
    assert [x.tolist() for x in TokenBudgetSampler(lengths, 256, seed=6).epoch_batches(0)] != e0


def test_unshuffled_batches_are_fixed_and_sorted():
    lengths = random_lengths()
    s = TokenBudgetSampler(lengths, 256, shuffle=False)
    e0 = s.epoch_batches(0)
    assert [x.tolist() for x in s.epoch_batches(3)] == [x.tolist() for x in e0]
    longest = [int(lengths[b].max()) for b in e0]
    assert longest == sorted(longest, reverse=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_is_disjoint_complete_and_even(world_size):
    lengths = random_lengths()
    full = TokenBudgetSampler(lengths, 256, seed=1).epoch_batches(2)
    ranks = [
        TokenBudgetSampler(lengths, 256, seed=1, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    shares = [s.epoch_batches(2) for s in ranks]
    per_rank = len(full) // world_size
    assert [len(s) for s in shares] == [per_rank] * world_size  # ranks stay in step
    seen = [set(np.concatenate(s).tolist()) for s in shares]
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    kept = full[: per_rank * world_size]  # the remainder (< world_size batches) is dropped
    assert set().union(*seen) == set(np.concatenate(kept).tolist())
    assert len(full) - per_rank * world_size < world_size


def test_too_few_batches_for_the_world_size():
    with pytest.raises(DataError, match="only 1 batches for 2 processes"):
        TokenBudgetSampler(np.array([3, 3]), 100, world_size=2, rank=1).epoch_batches(0)


@pytest.mark.parametrize("consumed", [0, 1, 7, 20, 21, 22, 30, 42])
def test_resume_continues_at_exactly_the_next_batch(consumed):
    lengths = random_lengths(n=200)
    assert len(TokenBudgetSampler(lengths, 256, seed=3)) == 21  # so 21 and 42 end an epoch
    reference = take(iter(TokenBudgetSampler(lengths, 256, seed=3)), 45)
    first = TokenBudgetSampler(lengths, 256, seed=3)
    it = iter(first)
    assert all(np.array_equal(x, y) for x, y in zip(take(it, consumed), reference))
    state = first.state_dict()
    assert set(state) == {"epoch", "position", "seed"}
    resumed = TokenBudgetSampler(lengths, 256, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    rest = take(iter(resumed), 45 - consumed)
    assert all(np.array_equal(x, y) for x, y in zip(rest, reference[consumed:], strict=True))


def test_state_counts_epochs_and_positions():
    sampler = TokenBudgetSampler(random_lengths(n=200), 256, seed=3)
    n = len(sampler)
    take(iter(sampler), n + 2)
    assert sampler.state_dict() == {"epoch": 1, "position": 2, "seed": 3}


def test_random_batches_cover_everything():
    batches = random_batches(10, 4, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))


# ----------------------------------------------------------------------------
# Collate
# ----------------------------------------------------------------------------


def test_pad_to_array():
    out = pad_to_array([[1, 2], [], [3]], fill=-1, offset=1)
    assert out.tolist() == [[-1, 1, 2], [-1, -1, -1], [-1, 3, -1]]


def test_collate_pairs_by_hand():
    pad, bos, eos = 0, 2, 3
    batch = collate_pairs([[10, 11, 12], [20]], [[30], [40, 41]], pad, bos, eos)
    assert batch["src"].tolist() == [[10, 11, 12, 3], [20, 3, 0, 0]]
    assert batch["src_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["tgt_in"].tolist() == [[2, 30, 0], [2, 40, 41]]
    assert batch["tgt_out"].tolist() == [[30, 3, IGNORE_INDEX], [40, 41, 3]]
    assert batch["tgt_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert all(
        v.dtype == (torch.bool if k.endswith("mask") else torch.long) for k, v in batch.items()
    )


def test_collate_tagging_labels_first_subwords_only():
    # sentence 0: words [a, bc] -> subwords [a, b, ##c]; sentence 1: word [d]
    batch = collate_tagging(
        [[7, 8, 9], [5]], [[0, 1, 1], [0]], [[1, 2], [3]], pad_id=0, cls_id=6, sep_id=5
    )
    assert batch["ids"].tolist() == [[6, 7, 8, 9, 5], [6, 5, 5, 0, 0]]
    assert batch["mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    no = IGNORE_INDEX
    assert batch["labels"].tolist() == [[no, 1, 2, no, no], [no, 3, no, no, no]]
    plain = collate_tagging([[7, 8, 9]], [[0, 1, 1]], [[1, 2]], pad_id=0)
    assert plain["labels"].tolist() == [[1, 2, no]]


def test_collate_tagging_gives_each_subword_its_words_bytes():
    from trainformer.data.chars import CHAR_WIDTH, word_bytes

    words = [["Zoë", "O'Neill"], ["x"]]
    chars = [word_bytes(w) for w in words]
    batch = collate_tagging([[7, 8, 9], [5]], [[0, 1, 1], [0]], [[1, 2], [3]], pad_id=0, cls_id=6, sep_id=5,
                            word_chars_list=[c.ravel() for c in chars])
    got = batch["chars"]
    assert got.shape == (2, 5, CHAR_WIDTH) and got.dtype == torch.long
    assert got[0, 1].tolist() == chars[0][0].tolist()  # <cls> shifts the words by one
    assert got[0, 2].tolist() == got[0, 3].tolist() == chars[0][1].tolist()  # both subwords of O'Neill
    assert bytes(b - 1 for b in got[0, 1].tolist() if b) == "Zoë".encode()
    assert not got[0, 0].any() and not got[0, 4].any() and not got[1, 2:].any()  # wrappers and padding


def test_word_bytes_keep_the_head_and_tail_of_long_words():
    from trainformer.data.chars import word_bytes

    row = word_bytes(["Verkehrsministerkonferenzen"], width=10)[0]
    assert bytes(b - 1 for b in row) == b"Verke" + b"enzen"  # "-enzen" survives
    assert word_bytes([""]).sum() == 0


def test_store_batches_resume_yields_the_same_tensors():
    rng = np.random.default_rng(0)
    src = [rng.integers(7, 50, size=rng.integers(1, 12)).tolist() for _ in range(120)]
    tgt = [rng.integers(7, 50, size=rng.integers(1, 12)).tolist() for _ in range(120)]
    store = TokenStore({"src": Ragged.from_lists(src), "tgt": Ragged.from_lists(tgt)})
    lengths = store.lengths("src", "tgt") + 1

    def make():
        return StoreBatches(TokenBudgetSampler(lengths, 64, seed=4), store, pair_collate(0, 2, 3))

    reference = list(itertools.islice(iter(make()), 40))
    first = make()
    list(itertools.islice(iter(first), 17))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(itertools.islice(iter(resumed), 23), reference[17:], strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    idx = next(iter(TokenBudgetSampler(lengths, 64, seed=4)))
    want = collate_pairs([src[i] for i in idx], [tgt[i] for i in idx], 0, 2, 3)
    assert all(torch.equal(reference[0][k], want[k]) for k in want)
    assert all(b["src"].numel() <= 64 and b["tgt_in"].numel() <= 64 for b in reference)


def test_pair_batches_use_only_the_indexed_rows_and_resume():
    src = [[10 + i] * (1 + i % 5) for i in range(60)]
    tgt = [[100 + i] * (1 + i % 7) for i in range(60)]
    store = TokenStore({"src": Ragged.from_lists(src), "tgt": Ragged.from_lists(tgt)})
    index = np.arange(0, 60, 2)  # even rows only
    lengths = store.lengths("src", "tgt")[index] + 1

    def make():
        return PairBatches(store, index, lengths, max_tokens=40, seed=2)

    reference = list(itertools.islice(iter(make()), 30))
    used = {int(v) - 10 for b in reference for v in b["src"][b["src_mask"]] if v >= 10}
    assert used == set(index.tolist())  # rows outside the index never appear
    assert all(b["src"].numel() <= 40 and b["tgt_in"].numel() <= 40 for b in reference)
    first = make()
    list(itertools.islice(iter(first), 11))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(itertools.islice(iter(resumed), 19), reference[11:], strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_pair_batches_truncate_to_max_len():
    store = TokenStore({"src": Ragged.from_lists([[7] * 9]), "tgt": Ragged.from_lists([[8] * 3])})
    batch = next(iter(PairBatches(store, np.array([0]), np.array([[10, 4]]), 100, max_len=5)))
    assert batch["src"].tolist() == [[7, 7, 7, 7, 3]]  # 4 tokens + </s> = max_len
    assert batch["tgt_in"].tolist() == [[2, 8, 8, 8]]

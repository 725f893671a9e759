"""Pre-tokenised cache (equal to direct tokenisation, reused, memory-mapped) and LM packing."""

import numpy as np
import pytest

from trainformer.config import TokenizerConfig
from trainformer.data import cache as cache_mod
from trainformer.data.cache import (
    Ragged,
    TokenStore,
    file_hash,
    tokenize_cached,
    tokenize_words_cached,
)
from trainformer.data.packing import collate_packed, pack_documents
from trainformer.data.tokenizer import train_tokenizer
from trainformer.paths import cache_dir

SRC = ["Hello world.", "How are you?", "Fine, thanks!", "A much longer sentence than the others."]
TGT = [
    "Bonjour le monde.",
    "Comment ça va\u202f?",
    "Bien, merci\u00a0!",
    "Une phrase bien plus longue.",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(SRC + TGT, TokenizerConfig(kind="bpe", vocab_size=120, min_frequency=1))


def test_ragged_round_trip():
    seqs = [[1, 2, 3], [], [4], [5, 6]]
    r = Ragged.from_lists(seqs)
    assert r.to_lists() == seqs and r.lengths().tolist() == [3, 0, 1, 2]
    assert r.values.dtype == np.int32 and r.offsets.tolist() == [0, 3, 3, 4, 6]


def test_cached_arrays_equal_direct_tokenisation(tok):
    store = tokenize_cached({"src": SRC, "tgt": TGT}, tok)
    assert store["src"].to_lists() == [tok.encode(t) for t in SRC]
    assert store["tgt"].to_lists() == [tok.encode(t) for t in TGT]
    assert store.lengths("src", "tgt").shape == (4, 2)
    assert isinstance(store["src"].values, np.memmap)  # loaded memory-mapped from disk
    assert store.take([3, 0])["tgt"][1].tolist() == tok.encode(TGT[0])


def test_second_call_loads_without_tokenising(tok, monkeypatch):
    first = tokenize_cached({"src": SRC}, tok, data_key="file-sha-1")
    monkeypatch.setattr(type(tok), "encode_batch", lambda *a: pytest.fail("tokenised again"))
    again = tokenize_cached({"src": SRC}, tok, data_key="file-sha-1")
    assert again.path == first.path and again["src"].to_lists() == first["src"].to_lists()
    leftovers = [p.name for p in cache_dir("tokenized").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary folder was renamed away


def test_key_changes_with_data_and_tokenizer(tok):
    a = tokenize_cached({"src": SRC}, tok)
    b = tokenize_cached({"src": SRC[:3]}, tok)
    other = train_tokenizer(SRC + TGT, TokenizerConfig(kind="bpe", vocab_size=100, min_frequency=1))
    c = tokenize_cached({"src": SRC}, other)
    assert len({a.path, b.path, c.path}) == 3
    assert c["src"].to_lists() == [other.encode(t) for t in SRC]


def test_words_cache_matches_encoder(tok):
    sents = [["Hello", "world", "."], ["Fine", ",", "thanks", "!"]]
    store = tokenize_words_cached(sents, tok)
    direct = tok.encode_words_batch(sents)
    assert store["ids"].to_lists() == [ids for ids, _ in direct]
    assert store["word_ids"].to_lists() == [w for _, w in direct]


def test_interrupted_writer_leaves_no_cache(tok, monkeypatch):
    def boom(self, folder):
        (folder / "partial.npy").write_bytes(b"x")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(TokenStore, "save", boom)
        with pytest.raises(KeyboardInterrupt):
            tokenize_cached({"src": ["only this"]}, tok)
    assert not any(cache_dir("tokenized").glob(".*"))
    assert tokenize_cached({"src": ["only this"]}, tok)["src"].to_lists() == [
        tok.encode("only this")
    ]


def test_file_hash(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert (
        file_hash(tmp_path / "a")
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert cache_mod.texts_hash(["ab"], ["c"]) != cache_mod.texts_hash(["a"], ["bc"])


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------


def naive_pack(docs: list[list[int]], seq_len: int, sep: int):
    """Reference with Python loops: stream, rows, document of each position, position in it."""
    stream, doc, pos = [], [], []
    for d, tokens in enumerate(docs):
        for p, t in enumerate([*tokens, sep]):
            stream.append(t)
            doc.append(d)
            pos.append(p)
    rows = []
    for r in range((len(stream) - 1) // seq_len):
        span = range(r * seq_len, r * seq_len + seq_len + 1)
        first = span[0]
        tokens = [stream[i] for i in span]
        doc_ids = [doc[i] - doc[first] for i in span]
        positions = [min(pos[i], i - first) for i in span]
        rows.append((tokens, doc_ids, positions))
    return rows


def test_pack_by_hand():
    packed = pack_documents(Ragged.from_lists([[1, 2, 3], [4, 5], [6]]), seq_len=3, sep_id=99)
    # stream: 1 2 3 99 | 4 5 99 | 6 99 ; rows of 4 starting every 3 tokens
    assert packed.tokens.tolist() == [[1, 2, 3, 99], [99, 4, 5, 99]]
    assert packed.doc_ids.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]  # </s> belongs to its document
    assert packed.positions.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_pack_matches_naive_reference():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 50, size=rng.integers(0, 30)).tolist() for _ in range(60)]
    packed = pack_documents(Ragged.from_lists(docs), seq_len=16, sep_id=3)
    want = naive_pack(docs, 16, 3)
    assert len(packed) == len(want) > 0
    assert packed.tokens.tolist() == [w[0] for w in want]
    assert packed.doc_ids.tolist() == [w[1] for w in want]
    assert packed.positions.tolist() == [w[2] for w in want]
    # every token of the stream is a target exactly once, in order, with </s> after each document
    stream = [t for d in docs for t in [*d, 3]]
    assert packed.tokens[:, 1:].reshape(-1).tolist() == stream[1 : 1 + packed.tokens[:, 1:].size]


def test_collate_packed_shifts_targets():
    packed = pack_documents(Ragged.from_lists([[1, 2, 3], [4, 5], [6]]), seq_len=3, sep_id=99)
    batch = collate_packed(packed, np.array([1, 0]))
    assert batch["ids"].tolist() == [[99, 4, 5], [1, 2, 3]]
    assert batch["targets"].tolist() == [[4, 5, 99], [2, 3, 99]]
    assert batch["doc_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 0, 1], [0, 1, 2]]

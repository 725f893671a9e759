"""Tokenizers: special ids, exact round trips, normalisation, save/load, training cache."""

import pytest

from trainformer.config import TokenizerConfig
from trainformer.data import tokenizer as tk
from trainformer.data.tokenizer import (
    SPECIAL_TOKENS,
    TextTokenizer,
    load_or_train_tokenizer,
    normalize_text,
    train_tokenizer,
)
from trainformer.errors import ConfigError, DataError

TEXTS = [
    "Hello world, how are you?",
    "I'm fine: thanks!",
    "Il a dit\u00a0: «\u00a0non\u00a0».",
    "Bonjour le monde\u202f!",
    "Pourquoi\u2009? Parce\u200bque.",
    'He said "yes" twice.',
] * 20


def cfg(kind: str = "bpe", **kw) -> TokenizerConfig:
    return TokenizerConfig(kind=kind, vocab_size=kw.pop("vocab_size", 300), min_frequency=1, **kw)


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return train_tokenizer(TEXTS, cfg("bpe"))


def test_normalize_text_maps_french_spaces():
    assert (
        normalize_text("Salut\u202f! Oui\u00a0; a\u2009b zero\u200bwidth")
        == "Salut ! Oui ; a b zerowidth"
    )
    assert normalize_text("ﬁn Ⅻ") == "fin XII"  # NFKC compatibility forms
    assert normalize_text("ÉTÉ", lowercase=True) == "été"


@pytest.mark.parametrize("kind", ["bpe", "byte_bpe", "wordpiece"])
def test_special_tokens_have_fixed_ids(kind):
    tok = train_tokenizer(TEXTS, cfg(kind))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.mask_id, tok.sep_id, tok.cls_id) == (4, 5, 6)
    assert 7 < tok.vocab_size <= 300


@pytest.mark.parametrize("kind", ["bpe", "byte_bpe"])
def test_round_trip_restores_normalised_text_exactly(kind):
    tok = train_tokenizer(TEXTS, cfg(kind))
    for text in TEXTS[:6] + ["how  are you ", 'you said: "Hello"?']:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == normalize_text(text)


def test_unseen_characters():
    bpe = train_tokenizer(TEXTS, cfg("bpe"))
    assert bpe.unk_id in bpe.encode("Zyx")  # BPE: <unk>, dropped by decode
    byte = train_tokenizer(TEXTS, cfg("byte_bpe"))
    assert byte.decode(byte.encode("Zyx 中")) == "Zyx 中"  # bytes: never <unk>


def test_tokenizer_normaliser_matches_python(bpe):
    # The special spaces are gone from the tokens, so "!" after U+202F tokenises like after " ".
    a = bpe.encode("Bonjour le monde\u202f!")
    b = bpe.encode("Bonjour le monde !")
    assert a == b
    assert bpe.decode(bpe.encode("Parce\u200bque")) == "Parceque"
    assert "\u202f" not in bpe.decode(a) and "\u00a0" not in bpe.decode(bpe.encode(TEXTS[2]))


def test_wordpiece_decodes_words():
    tok = train_tokenizer(TEXTS, cfg("wordpiece"))
    assert tok.decode(tok.encode("Hello world how are you")) == "Hello world how are you"


def test_lowercase_option():
    tok = train_tokenizer(TEXTS, cfg("bpe", lowercase=True))
    assert tok.decode(tok.encode("HELLO World")) == "hello world"


def test_encode_batch_equals_encode_and_decode_skips_specials(bpe):
    batch = bpe.encode_batch(TEXTS[:6])
    assert batch == [bpe.encode(t) for t in TEXTS[:6]]
    ids = [bpe.bos_id, *batch[0], bpe.eos_id, bpe.pad_id, bpe.pad_id]
    assert bpe.decode(ids) == TEXTS[0]
    assert bpe.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_encode_words_batch_maps_subwords_to_words(bpe):
    ((ids, word_ids),) = bpe.encode_words_batch([["Bonjour", "monde", "Zz"]])
    assert len(ids) == len(word_ids) and sorted(set(word_ids)) == [0, 1, 2]
    assert word_ids == sorted(word_ids)


def test_added_special_tokens_are_never_split():
    tok = train_tokenizer(TEXTS, cfg("byte_bpe"))
    n = tok.vocab_size
    ids = tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    assert ids == [n, n + 1] and tok.vocab_size == n + 2
    enc = tok.encode("<|user|>Hello<|assistant|>")
    assert enc[0] == n and ids[1] in enc
    assert tok.decode(enc) == "Hello"


def test_save_and_load_round_trip(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    again = TextTokenizer.load(path)
    assert again.encode_batch(TEXTS[:6]) == bpe.encode_batch(TEXTS[:6])
    assert again.fingerprint() == bpe.fingerprint()


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        TextTokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path / "bad.json")


def test_cache_reuses_trained_tokenizer(monkeypatch):
    calls = []

    def texts():
        calls.append(1)
        return TEXTS

    first = load_or_train_tokenizer(texts, cfg("bpe"), cache_key="data-v1")
    second = load_or_train_tokenizer(texts, cfg("bpe"), cache_key="data-v1")
    assert len(calls) == 1  # the second call did not even ask for the texts
    assert second.fingerprint() == first.fingerprint()
    with monkeypatch.context() as m:
        m.setattr(tk, "train_tokenizer", lambda *a: pytest.fail("retrained"))
        load_or_train_tokenizer(texts, cfg("bpe"), cache_key="data-v1")
    # other data or other settings do retrain
    load_or_train_tokenizer(texts, cfg("bpe"), cache_key="data-v2")
    load_or_train_tokenizer(texts, cfg("bpe", vocab_size=250), cache_key="data-v1")
    assert len(calls) == 3


def test_configured_path_wins(bpe, tmp_path):
    path = tmp_path / "tok.json"
    bpe.save(path)
    tok = load_or_train_tokenizer(lambda: pytest.fail("trained"), cfg("bpe", path=str(path)), "k")
    assert tok.fingerprint() == bpe.fingerprint()
    with pytest.raises(ConfigError, match="data.tokenizer.path"):
        load_or_train_tokenizer(lambda: TEXTS, cfg("bpe", path=str(tmp_path / "x.json")), "k")

"""Subword tokenizers (Hugging Face `tokenizers`) behind one small wrapper.

Three kinds, chosen by `TokenizerConfig.kind`:

- ``bpe``: BPE over a Metaspace pre-tokenizer (SentencePiece style), so
  `decode` restores the spaces of the normalised text exactly; one joint
  EN+FR vocabulary for translation, scored with sacreBLEU on detokenised text.
- ``byte_bpe``: byte-level BPE (GPT-2 style) for decoders; never emits `<unk>`.
- ``wordpiece``: BERT-style pre-tokenizer and ``##`` continuation pieces, for encoders.

Every kind has the same special tokens at fixed ids (`SPECIAL_TOKENS`) and
the same normaliser: NFKC, then U+202F / U+00A0 / U+2009 to a plain space and
U+200B removed — French typography in Tatoeba mixes these with plain spaces
before ``? ! : ;``. `normalize_text` does the same in Python for references.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from trainformer.config import TokenizerConfig
from trainformer.errors import ConfigError, DataError
from trainformer.paths import cache_dir

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>", "<cls>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID = range(len(SPECIAL_TOKENS))

# Characters the normaliser maps, applied after NFKC (which already maps the
# three spaces; listing them keeps the intent explicit and NFKC-independent).
_SPACE_MAP = {"\u202f": " ", "\u00a0": " ", "\u2009": " ", "\u200b": ""}

_CACHE_VERSION = "1"  # bump when training or the normaliser changes


def normalize_text(text: str, lowercase: bool = False) -> str:
    """The tokenizer's normalisation in Python: NFKC, special spaces, optional lowercase."""
    text = unicodedata.normalize("NFKC", text)
    for src, dst in _SPACE_MAP.items():
        text = text.replace(src, dst)
    return text.lower() if lowercase else text


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()]
    steps += [normalizers.Replace(src, dst) for src, dst in _SPACE_MAP.items()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


class TextTokenizer:
    """A trained `tokenizers.Tokenizer` with fixed special ids and batch encoding.

    `encode` adds no special tokens: collate functions add `<s>`/`</s>` where
    a task needs them.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    mask_id = MASK_ID
    sep_id = SEP_ID
    cls_id = CLS_ID

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise DataError(f"{source}: expected special token {tok!r} at id {i}")
        self.hf = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, including added special tokens."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust batch encoder."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_words_batch(self, sentences: list[list[str]]) -> list[tuple[list[int], list[int]]]:
        """Pre-split sentences (tagging) -> per sentence (ids, word index of each id)."""
        encs = self.hf.encode_batch(list(sentences), is_pretokenized=True, add_special_tokens=False)
        return [(e.ids, e.word_ids) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (padding, <s>, </s>...) are dropped by default."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        rows = [[int(i) for i in ids] for ids in batch]
        return self.hf.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens that are never split (chat role markers); returns their ids."""
        self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.hf.token_to_id(t) for t in tokens]

    def to_str(self) -> str:
        """The tokenizer as JSON text (what `save` writes)."""
        return self.hf.to_str()

    def fingerprint(self) -> str:
        """A sha256 of the tokenizer's JSON, for cache keys."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def save(self, path: Path | str) -> None:
        """Write ``tokenizer.json`` (atomically: a temp file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | str) -> TextTokenizer:
        """Read a ``tokenizer.json`` written by `save` (DataError when missing or invalid)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, source=str(path))


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def _empty_tokenizer(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of `cfg.kind` and its trainer."""
    common = dict(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        tok.decoder = decoders.Metaspace(prepend_scheme="always")
        trainer = trainers.BpeTrainer(**common)
    elif cfg.kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # all 256 bytes in the vocabulary, so any text encodes without <unk>
        trainer = trainers.BpeTrainer(
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(continuing_subword_prefix="##", **common)
    else:
        raise ConfigError(
            f"data.tokenizer.kind: expected bpe, byte_bpe or wordpiece, got {cfg.kind!r}"
        )
    tok.normalizer = _normalizer(cfg.lowercase)
    return tok, trainer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> TextTokenizer:
    """Train a tokenizer of `cfg.kind` with `cfg.vocab_size` ids on `texts`."""
    tok, trainer = _empty_tokenizer(cfg)
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def tokenizer_cache_path(cfg: TokenizerConfig, cache_key: str) -> Path:
    """Where `load_or_train_tokenizer` keeps the tokenizer for these data and settings."""
    settings = {
        "key": cache_key,
        "kind": cfg.kind,
        "vocab_size": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
        "lowercase": cfg.lowercase,
        "version": _CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir("tokenizers") / f"{cfg.kind}-{cfg.vocab_size}-{digest}.json"


def load_or_train_tokenizer(
    texts_factory: Callable[[], Iterable[str]], cfg: TokenizerConfig, cache_key: str
) -> TextTokenizer:
    """The tokenizer for `cfg`: `cfg.path` if set, else a cached one, else a new one.

    Args:
        texts_factory: called only when training is needed; returns the training texts.
        cfg: kind, size and normalisation; `cfg.path` names an existing tokenizer.json.
        cache_key: identifies the training data (e.g. a content hash of the data
            file and the split seed); with the settings it names the cache file
            under ``cache_dir("tokenizers")``.
    """
    if cfg.path:
        if not Path(cfg.path).is_file():
            raise ConfigError(f"data.tokenizer.path: file not found: {cfg.path}")
        return TextTokenizer.load(cfg.path)
    path = tokenizer_cache_path(cfg, cache_key)
    if path.is_file():
        return TextTokenizer.load(path)
    tok = train_tokenizer(texts_factory(), cfg)
    tok.save(path)
    return tok

"""Readers for every supported file format, with a bad-line policy.

Each reader returns a `ReadResult`: the examples plus a `BadLines` report.
Under ``bad_lines="skip"`` a bad line (or the example it belongs to) is
dropped and counted by reason, and the first five are kept as
``file:line: reason``; under ``"error"`` the first one raises `DataError`
with that position. Files are read as bytes and decoded line by line only
when the whole file is not valid UTF-8, so one bad byte costs one line, not
the file.

Over-long examples: readers take an optional character limit (``max_chars``,
0 = none); the token limit (`DataConfig.max_len`) is applied after
tokenisation by `filter_too_long`, which reports into the same `BadLines`.

Formats (`DataConfig.format`): ``tsv`` (parallel TSV with a header),
``parallel`` (two aligned plain-text files), ``jsonl``, ``conll``,
``semeval``, ``dailydialog``, ``text``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import numpy as np

from trainformer.data.markers import entity_markers_ok
from trainformer.errors import DataError

Policy = Literal["skip", "error"]

# Reasons, as they appear in reports and error messages.
INVALID_UTF8 = "invalid UTF-8"
COLUMNS = "wrong column count"
EMPTY = "empty field"
TOO_LONG = "too long"
MALFORMED_TAGS = "malformed tags"
MALFORMED_LABEL = "malformed label"
INVALID_JSON = "invalid JSON"
MISSING_FIELD = "missing field"
MISSING_EOU = "missing __eou__"

N_POSITIONS = 5  # bad positions kept in a report


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------


class Pair(NamedTuple):
    """A source/target pair (translation). `line` is 1-based in its file."""

    src: str
    tgt: str
    line: int


class TaggedSentence(NamedTuple):
    """A sentence of tokens with one tag each (NER). `line` is its first line."""

    tokens: list[str]
    tags: list[str]
    line: int


class RelationExample(NamedTuple):
    """A SemEval-2010 Task 8 example; `sentence` keeps its ``<e1>``/``<e2>`` markers."""

    id: str
    sentence: str
    relation: str
    line: int


class Dialogue(NamedTuple):
    """A multi-turn dialogue: utterances in order, speakers alternating."""

    utterances: list[str]
    line: int


class Document(NamedTuple):
    """A document for language modelling. `line` is its first line."""

    text: str
    line: int


E = TypeVar("E")


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------


@dataclass
class BadLines:
    """Counts of dropped examples per reason and the first few positions.

    One entry per dropped example, at its first bad line (a CoNLL sentence
    with two bad tokens counts once).
    """

    policy: Policy = "skip"
    counts: Counter[str] = field(default_factory=Counter)
    positions: list[str] = field(default_factory=list)  # "file:line: reason"

    def add(self, path: Path | str, line: int, reason: str, detail: str = "") -> None:
        """Record a bad line under `reason` (one of the constants above).

        Under the ``error`` policy raise `DataError` (``file:line: reason (detail)``) instead.
        """
        where = f"{path}:{line}: {reason}" + (f" ({detail})" if detail else "")
        if self.policy == "error":
            raise DataError(where + " (set data.bad_lines=skip to drop such lines)")
        self.counts[reason] += 1
        if len(self.positions) < N_POSITIONS:
            self.positions.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadLines) -> None:
        self.counts.update(other.counts)
        room = N_POSITIONS - len(self.positions)
        self.positions.extend(other.positions[: max(room, 0)])

    def report(self) -> dict[str, Any]:
        """Plain data for logs: ``{"total", "counts", "first"}``."""
        return {"total": self.total, "counts": dict(self.counts), "first": list(self.positions)}


@dataclass
class ReadResult(Generic[E]):
    """Examples read from `path` and what was dropped."""

    path: Path
    examples: list[E]
    bad: BadLines

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------
# Lines
# ----------------------------------------------------------------------------


def numbered_lines(path: Path, bad: BadLines) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the newline) for each decodable line.

    Decodes the whole file at once when it is valid UTF-8 (the fast, common
    case) and line by line otherwise; undecodable lines go to `bad`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = None
    if lines is not None:
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start a line
        for i, text in enumerate(lines, 1):
            yield i, text.removesuffix("\r")
        return
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    for i, chunk in enumerate(raw, 1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(path, i, INVALID_UTF8)
            continue
        yield i, text.removesuffix("\r")


def _too_long(max_chars: int, *texts: str) -> bool:
    return max_chars > 0 and any(len(t) > max_chars for t in texts)


# ----------------------------------------------------------------------------
# Parallel data
# ----------------------------------------------------------------------------


def _add_pair(pairs: list[Pair], bad: BadLines, path: Path, line: int, src: str, tgt: str,
              max_chars: int, tgt_path: Path | None = None) -> None:
    """Append the stripped pair, or count it as empty (on the side that is) or too long."""
    src, tgt = src.strip(), tgt.strip()
    if not src or not tgt:
        bad.add(tgt_path if tgt_path is not None and src else path, line, EMPTY)
    elif _too_long(max_chars, src, tgt):
        bad.add(path, line, TOO_LONG)
    else:
        pairs.append(Pair(src, tgt, line))


def _tsv_columns(path: Path, header: list[str], src_col: str, tgt_col: str) -> tuple[int, int]:
    """Indices of the source and target columns named in the header."""
    if src_col in header and tgt_col in header:
        return header.index(src_col), header.index(tgt_col)
    if len(header) == 2:
        return 0, 1  # a two-column file with other names: take them in order
    raise DataError(
        f"{path}:1: expected a header naming columns {src_col!r} and {tgt_col!r}, got {header!r}"
    )


def read_parallel_tsv(
    path: Path,
    src_col: str = "en",
    tgt_col: str = "fr",
    bad_lines: Policy = "skip",
    max_chars: int = 0,
) -> ReadResult[Pair]:
    """A TSV of sentence pairs with a header line (``en<TAB>fr``).

    Fields are split on tabs only, with no quoting (csv.QUOTE_NONE): many
    sentences contain ``"``. A row must have as many fields as the header.
    """
    bad = BadLines(bad_lines)
    lines = numbered_lines(path, bad)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path}: empty file, expected a header line such as 'en<TAB>fr'")
    header = first[1].split("\t")
    si, ti = _tsv_columns(path, header, src_col, tgt_col)
    pairs = []
    for i, text in lines:
        fields = text.split("\t")
        if len(fields) != len(header):
            bad.add(path, i, COLUMNS, f"expected {len(header)}, got {len(fields)}")
            continue
        _add_pair(pairs, bad, path, i, fields[si], fields[ti], max_chars)
    return ReadResult(Path(path), pairs, bad)


def read_aligned(
    src_path: Path, tgt_path: Path, bad_lines: Policy = "skip", max_chars: int = 0
) -> ReadResult[Pair]:
    """Two plain-text files with one sentence per line, aligned by line number.

    Files of different lengths cannot be aligned and always raise `DataError`.
    A line that is bad on either side drops the pair.
    """
    bad = BadLines(bad_lines)
    src = dict(numbered_lines(src_path, bad))
    tgt = dict(numbered_lines(tgt_path, bad))
    n_src = max(src, default=0)
    n_tgt = max(tgt, default=0)
    if n_src != n_tgt:
        raise DataError(
            f"{tgt_path}: has {n_tgt} lines but {src_path} has {n_src}; expected aligned files"
        )
    pairs = []
    for i in range(1, n_src + 1):
        if i not in src or i not in tgt:
            continue  # already reported as invalid UTF-8
        _add_pair(pairs, bad, src_path, i, src[i], tgt[i], max_chars, tgt_path=tgt_path)
    return ReadResult(Path(src_path), pairs, bad)


def _json_pair(obj: Any, src_key: str, tgt_key: str) -> tuple[Any, Any] | None:
    if not isinstance(obj, dict):
        return None
    for s, t in (("src", "tgt"), (src_key, tgt_key)):
        if s in obj and t in obj:
            return obj[s], obj[t]
    return None


def read_jsonl(
    path: Path,
    src_key: str = "en",
    tgt_key: str = "fr",
    bad_lines: Policy = "skip",
    max_chars: int = 0,
) -> ReadResult[Pair]:
    """JSON lines of ``{"src": ..., "tgt": ...}`` or language keys (``{"en": ..., "fr": ...}``).

    Blank lines are ignored.
    """
    bad = BadLines(bad_lines)
    pairs = []
    for i, text in numbered_lines(path, bad):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            bad.add(path, i, INVALID_JSON)
            continue
        pair = _json_pair(obj, src_key, tgt_key)
        if pair is None or not all(isinstance(v, str) for v in pair):
            bad.add(
                path, i, MISSING_FIELD, f"expected string fields src/tgt or {src_key}/{tgt_key}"
            )
            continue
        _add_pair(pairs, bad, path, i, pair[0], pair[1], max_chars)
    return ReadResult(Path(path), pairs, bad)


# ----------------------------------------------------------------------------
# Token tagging (CoNLL-2003, WNUT-17)
# ----------------------------------------------------------------------------

# IOB1/IOB2/BIOES tags: O, or a prefix and a type.
_TAG = re.compile(r"^(O|[BIES]-\S+)$")


class _SentenceBuilder:
    """Collects token lines; a sentence with any bad line is dropped once."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = 0  # first line of the sentence; 0 before its first token line
        self.tokens: list[str] = []
        self.tags: list[str] = []
        self.bad_at: tuple[int, str, str] | None = None  # (line, reason, detail)

    def flush(self, out: list[TaggedSentence], bad: BadLines, path: Path, max_chars: int) -> None:
        if self.bad_at is not None:
            bad.add(path, *self.bad_at)
        elif self.tokens and _too_long(max_chars, " ".join(self.tokens)):
            bad.add(path, self.start, TOO_LONG)
        elif self.tokens:
            out.append(TaggedSentence(self.tokens, self.tags, self.start))
        self.reset()


def _conll_fields(text: str) -> list[str]:
    # WNUT separates with a tab, CoNLL-2003 with spaces; tokens contain neither.
    return text.split("\t") if "\t" in text else text.split()


def read_conll(
    path: Path, bad_lines: Policy = "skip", max_chars: int = 0
) -> ReadResult[TaggedSentence]:
    """One token per line, the tag in the last column, a blank line between sentences.

    Reads CoNLL-2003 (``token POS chunk NER``, space-separated) and WNUT-17
    (``token<TAB>tag``). Whitespace-only lines separate sentences;
    ``-DOCSTART-`` lines are skipped. The first token line fixes the column
    count. A tag must be ``O`` or ``B-/I-/E-/S-TYPE``; continuity (``I-X``
    after ``O``) is not checked since IOB1 allows it. A bad line drops its
    whole sentence.
    """
    bad = BadLines(bad_lines)
    out: list[TaggedSentence] = []
    sent = _SentenceBuilder()
    n_cols = 0
    for i, text in numbered_lines(path, bad):
        if not text.strip():
            sent.flush(out, bad, path, max_chars)
            continue
        if text.startswith("-DOCSTART-"):
            continue
        if not sent.start:
            sent.start = i
        fields = _conll_fields(text)
        n_cols = n_cols or max(len(fields), 2)
        if sent.bad_at is not None:
            continue
        if len(fields) != n_cols:
            sent.bad_at = (i, COLUMNS, f"expected {n_cols}, got {len(fields)}")
        elif not fields[0] or not fields[-1]:
            sent.bad_at = (i, EMPTY, "")
        elif not _TAG.match(fields[-1]):
            sent.bad_at = (i, MALFORMED_TAGS, repr(fields[-1]))
        else:
            sent.tokens.append(fields[0])
            sent.tags.append(fields[-1])
    sent.flush(out, bad, path, max_chars)
    return ReadResult(Path(path), out, bad)


# ----------------------------------------------------------------------------
# Relations (SemEval-2010 Task 8)
# ----------------------------------------------------------------------------

_RELATION = re.compile(r"^(Other|[A-Za-z]+-[A-Za-z]+\((e1,e2|e2,e1)\))$")


def read_semeval(
    path: Path, bad_lines: Policy = "skip", max_chars: int = 0
) -> ReadResult[RelationExample]:
    """SemEval-2010 Task 8 as TSV: header, then ``id<TAB>sentence<TAB>relation``.

    The sentence must carry one ``<e1>..</e1>`` and one ``<e2>..</e2>``; the
    relation must be ``Other`` or ``Name-Name(e1,e2)`` / ``(e2,e1)``.
    """
    bad = BadLines(bad_lines)
    lines = numbered_lines(path, bad)
    if next(lines, None) is None:
        raise DataError(f"{path}: empty file, expected a header 'id<TAB>sentence<TAB>relation'")
    out = []
    for i, text in lines:
        fields = text.split("\t")
        if len(fields) != 3:
            bad.add(path, i, COLUMNS, f"expected 3, got {len(fields)}")
            continue
        ex_id, sentence, relation = (f.strip() for f in fields)
        if not ex_id or not sentence or not relation:
            bad.add(path, i, EMPTY)
        elif not entity_markers_ok(sentence):
            bad.add(path, i, MALFORMED_TAGS, "expected one <e1>..</e1> and one <e2>..</e2>")
        elif not _RELATION.match(relation):
            bad.add(path, i, MALFORMED_LABEL, repr(relation))
        elif _too_long(max_chars, sentence):
            bad.add(path, i, TOO_LONG)
        else:
            out.append(RelationExample(ex_id, sentence, relation, i))
    return ReadResult(Path(path), out, bad)


# ----------------------------------------------------------------------------
# Dialogue (DailyDialog)
# ----------------------------------------------------------------------------

EOU = "__eou__"


def read_dailydialog(
    path: Path, bad_lines: Policy = "skip", max_chars: int = 0
) -> ReadResult[Dialogue]:
    """One dialogue per line, each utterance ending with `` __eou__``.

    A line that does not end with ``__eou__`` or has an empty utterance is bad.
    """
    bad = BadLines(bad_lines)
    out = []
    for i, text in numbered_lines(path, bad):
        text = text.strip()
        if not text:
            continue
        if not text.endswith(EOU):
            bad.add(path, i, MISSING_EOU)
            continue
        utterances = [u.strip() for u in text[: -len(EOU)].split(EOU)]
        if not all(utterances):
            bad.add(path, i, EMPTY)
        elif _too_long(max_chars, *utterances):
            bad.add(path, i, TOO_LONG)
        else:
            out.append(Dialogue(utterances, i))
    return ReadResult(Path(path), out, bad)


# ----------------------------------------------------------------------------
# Plain text (language modelling)
# ----------------------------------------------------------------------------


def read_text(
    path: Path, doc_sep: Literal["blank_line", "line"] = "blank_line", bad_lines: Policy = "skip"
) -> ReadResult[Document]:
    """Documents from a plain-text file.

    ``doc_sep="blank_line"``: runs of non-blank lines form a document (joined
    with newlines); ``"line"``: every non-blank line is a document. Only
    undecodable lines are bad (the line is dropped, not the document).
    """
    bad = BadLines(bad_lines)
    docs: list[Document] = []
    run: list[str] = []
    start = 0
    for i, text in numbered_lines(path, bad):
        if not text.strip():
            if run:
                docs.append(Document("\n".join(run), start))
            run = []
            continue
        if doc_sep == "line":
            docs.append(Document(text, i))
            continue
        if not run:
            start = i
        run.append(text)
    if run:
        docs.append(Document("\n".join(run), start))
    return ReadResult(Path(path), docs, bad)


# ----------------------------------------------------------------------------
# The token-level length limit (a second pass after tokenisation)
# ----------------------------------------------------------------------------


def filter_too_long(
    result: ReadResult[Any],
    lengths: np.ndarray,
    max_len: int,
    rows: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Positions of the examples whose token lengths are all <= `max_len`.

    Args:
        result: what a reader returned; its `bad` report receives the dropped ones
            (and raises under the ``error`` policy) at their file lines.
        lengths: (K,) or (K, F) token counts per example (and field).
        max_len: the longest allowed sequence (`DataConfig.max_len`).
        rows: (K,) index in `result.examples` of each length row (e.g. a split's
            rows); None when `lengths` covers every example in order.
    Returns:
        (M,) int64 positions into `lengths` (not into `result.examples`), in order.
    """
    lengths = np.asarray(lengths)
    rows = np.arange(len(result.examples)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) != len(lengths):
        raise ValueError(
            f"filter_too_long: {len(lengths)} lengths for {len(rows)} examples; "
            "pass rows= (the example index of each length) for a subset"
        )
    longest = lengths.reshape(len(lengths), -1).max(axis=1)  # (K,)
    for k in np.flatnonzero(longest > max_len):
        line = result.examples[rows[k]].line
        result.bad.add(result.path, line, TOO_LONG, f"{longest[k]} > {max_len} tokens")
    return np.flatnonzero(longest <= max_len)

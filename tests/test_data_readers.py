"""Readers under both bad-line policies, the dataset registry, and the real data counts."""

from pathlib import Path

import numpy as np
import pytest

from trainformer.config import DataConfig
from trainformer.data import markers, readers
from trainformer.data.registry import (
    DATASETS,
    read_dataset,
    read_translation_pairs,
    resolve_dataset,
)
from trainformer.errors import ConfigError, DataError
from trainformer.paths import find_data

BAD_UTF8 = b"caf\xe9 au lait"  # latin-1 bytes: invalid UTF-8


def write(path: Path, *lines: bytes | str) -> Path:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def assert_skipped(result, expected: dict[str, int], lines: list[int]) -> None:
    """Counts per reason and the file:line positions, in order."""
    assert dict(result.bad.counts) == expected
    got = [int(p.split(":")[1]) for p in result.bad.positions]
    assert got == lines[: readers.N_POSITIONS]
    assert all(p.startswith(f"{result.path}:") for p in result.bad.positions)


def assert_error_at(fn, path: Path, line: int, reason: str) -> None:
    with pytest.raises(DataError) as err:
        fn()
    assert f"{path}:{line}: {reason}" in str(err.value)


# ----------------------------------------------------------------------------
# Parallel TSV
# ----------------------------------------------------------------------------


@pytest.fixture
def tsv(tmp_path):
    return write(
        tmp_path / "pairs.tsv",
        "en\tfr",
        'He said "hi".\tIl a dit "salut".',  # 2: quotes are plain characters
        "one\ttwo\tthree",  # 3: wrong column count
        BAD_UTF8 + b"\tdu caf\xc3\xa9",  # 4: invalid UTF-8
        "Hello.\t ",  # 5: empty side
        "Bye.\tSalut\u202f!",  # 6
        "no tab here",  # 7: wrong column count
    )


def test_tsv_skip_counts_reasons_and_positions(tsv):
    r = readers.read_parallel_tsv(tsv, "en", "fr", "skip")
    assert [(p.src, p.tgt, p.line) for p in r.examples] == [
        ('He said "hi".', 'Il a dit "salut".', 2),
        ("Bye.", "Salut\u202f!", 6),
    ]
    assert_skipped(r, {readers.COLUMNS: 2, readers.INVALID_UTF8: 1, readers.EMPTY: 1}, [3, 4, 5, 7])
    assert r.bad.positions[0] == f"{tsv}:3: {readers.COLUMNS} (expected 2, got 3)"
    assert r.bad.report()["total"] == 4


def test_tsv_error_policy_stops_at_first_bad_line(tsv):
    assert_error_at(
        lambda: readers.read_parallel_tsv(tsv, bad_lines="error"), tsv, 3, readers.COLUMNS
    )


def test_tsv_invalid_utf8_is_first_error(tmp_path):
    path = write(tmp_path / "p.tsv", "en\tfr", "a\tb", BAD_UTF8 + b"\tx")
    assert_error_at(
        lambda: readers.read_parallel_tsv(path, bad_lines="error"), path, 3, readers.INVALID_UTF8
    )


def test_tsv_columns_by_header_name_and_character_limit(tmp_path):
    path = write(tmp_path / "p.tsv", "id\tfr\ten", "1\tun\tone", "2\tdeux\ttwo two two two")
    r = readers.read_parallel_tsv(path, "en", "fr", max_chars=10)
    assert [(p.src, p.tgt) for p in r.examples] == [("one", "un")]
    assert r.bad.counts == {readers.TOO_LONG: 1}
    with pytest.raises(DataError, match=r"p.tsv:1: expected a header naming columns 'de' and 'fr'"):
        readers.read_parallel_tsv(path, "de", "fr")


def test_only_five_positions_are_kept_but_all_are_counted(tmp_path):
    path = write(tmp_path / "p.tsv", "en\tfr", *["x"] * 8, "a\tb")
    r = readers.read_parallel_tsv(path)
    assert r.bad.counts[readers.COLUMNS] == 8 and len(r.bad.positions) == 5
    assert len(r.examples) == 1


def test_crlf_line_endings_are_stripped(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes(b"en\tfr\r\nHi.\tSalut.\r\n")
    assert readers.read_parallel_tsv(path).examples[0][:2] == ("Hi.", "Salut.")


# ----------------------------------------------------------------------------
# Aligned text files and JSONL
# ----------------------------------------------------------------------------


def test_aligned_files_skip_and_error(tmp_path):
    src = write(tmp_path / "c.en", "one", BAD_UTF8, "three", "four")
    tgt = write(tmp_path / "c.fr", "un", "deux", "", "quatre")
    r = readers.read_aligned(src, tgt)
    assert [(p.src, p.tgt, p.line) for p in r.examples] == [("one", "un", 1), ("four", "quatre", 4)]
    assert r.bad.counts == {readers.INVALID_UTF8: 1, readers.EMPTY: 1}
    assert r.bad.positions == [f"{src}:2: {readers.INVALID_UTF8}", f"{tgt}:3: {readers.EMPTY}"]
    assert_error_at(lambda: readers.read_aligned(src, tgt, "error"), src, 2, readers.INVALID_UTF8)


def test_aligned_files_of_different_lengths_always_fail(tmp_path):
    src = write(tmp_path / "c.en", "one", "two")
    tgt = write(tmp_path / "c.fr", "un")
    with pytest.raises(DataError, match="has 1 lines but .* has 2"):
        readers.read_aligned(src, tgt)


def test_jsonl_both_key_styles_and_bad_lines(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        '{"src": "a", "tgt": "b"}',
        '{"en": "c", "fr": "d"}',
        "",  # blank: ignored
        "{not json",  # 4
        '{"en": "e"}',  # 5: missing field
        '{"src": "f", "tgt": "  "}',  # 6: empty
        BAD_UTF8,  # 7
    )
    r = readers.read_jsonl(path, "en", "fr")
    assert [(p.src, p.tgt, p.line) for p in r.examples] == [("a", "b", 1), ("c", "d", 2)]
    expected = {
        readers.INVALID_JSON: 1,
        readers.MISSING_FIELD: 1,
        readers.EMPTY: 1,
        readers.INVALID_UTF8: 1,
    }
    assert_skipped(r, expected, [4, 5, 6, 7])
    assert_error_at(
        lambda: readers.read_jsonl(path, bad_lines="error"), path, 4, readers.INVALID_JSON
    )


# ----------------------------------------------------------------------------
# CoNLL
# ----------------------------------------------------------------------------


@pytest.fixture
def conll(tmp_path):
    return write(
        tmp_path / "ner.txt",
        "-DOCSTART- -X- -X- O",
        "",
        "EU NNP B-NP B-ORG",  # 3: sentence 1
        "rejects VBZ B-VP O",
        "",
        "Peter NNP B-NP B-PER",  # 6: sentence 2, bad tag on line 7
        "Blackburn NNP B-NP PERSON",
        "",
        "BRUSSELS NNP B-NP",  # 9: sentence 3, three columns
        "",
        "   ",  # whitespace-only lines also separate sentences
        "Germany NNP B-NP B-LOC",  # 12: sentence 4, invalid UTF-8 on line 13
        BAD_UTF8,
        "",
        "Rome NNP B-NP B-LOC",  # 15
    )


def test_conll_skip_drops_whole_sentences(conll):
    r = readers.read_conll(conll)
    assert [(s.tokens, s.tags, s.line) for s in r.examples] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3),
        (["Germany"], ["B-LOC"], 12),  # the undecodable line is gone, the sentence kept
        (["Rome"], ["B-LOC"], 15),
    ]
    assert_skipped(
        r, {readers.INVALID_UTF8: 1, readers.MALFORMED_TAGS: 1, readers.COLUMNS: 1}, [7, 9, 13]
    )
    assert f"{conll}:7: {readers.MALFORMED_TAGS} ('PERSON')" in r.bad.positions


def test_conll_error_policy(conll):
    assert_error_at(lambda: readers.read_conll(conll, "error"), conll, 7, readers.MALFORMED_TAGS)


def test_wnut_tab_format(tmp_path):
    path = write(
        tmp_path / "w.conll", "@paul\tO", "Hey\tO", "\t", "New\tB-location", "York\tI-location", ""
    )
    r = readers.read_conll(path)
    assert [s.tokens for s in r.examples] == [["@paul", "Hey"], ["New", "York"]]
    assert r.examples[1].tags == ["B-location", "I-location"] and r.bad.total == 0


# ----------------------------------------------------------------------------
# SemEval, DailyDialog, plain text
# ----------------------------------------------------------------------------


def test_semeval_reasons(tmp_path):
    path = write(
        tmp_path / "rel.tsv",
        "id\tsentence\trelation",
        "1\tThe <e1>child</e1> was in the <e2>cradle</e2>.\tContent-Container(e1,e2)",
        "2\tThe <e1>child</e1> was in the cradle.\tOther",  # 3: no e2
        "3\tA <e1>b</e1> c <e2>d</e2>.\tcontent(e1,e2)",  # 4: malformed label
        "4\tonly two columns",  # 5
        "5\t<e2>Smoke</e2> from a <e1>fire</e1>.\tCause-Effect(e1,e2)",  # e2 before e1 is fine
    )
    r = readers.read_semeval(path)
    assert [e.id for e in r.examples] == ["1", "5"]
    assert r.examples[0].relation == "Content-Container(e1,e2)"
    assert_skipped(
        r, {readers.MALFORMED_TAGS: 1, readers.MALFORMED_LABEL: 1, readers.COLUMNS: 1}, [3, 4, 5]
    )
    assert_error_at(lambda: readers.read_semeval(path, "error"), path, 3, readers.MALFORMED_TAGS)


def test_entity_markers():
    assert not markers.entity_markers_ok("<e1>a <e2>b</e1> c</e2>")  # overlapping
    assert not markers.entity_markers_ok("<e1></e1> <e2>b</e2>")  # empty entity
    text, e1, e2 = markers.strip_entity_markers("The <e1>child</e1> in the <e2>cradle</e2>.")
    assert (
        text == "The child in the cradle."
        and text[slice(*e1)] == "child"
        and text[slice(*e2)] == "cradle"
    )


def test_dailydialog(tmp_path):
    path = write(
        tmp_path / "dialogues_train.txt",
        "Hi , Jim . __eou__ Hello ! __eou__",
        "No end marker here . __eou__ dangling",  # 2
        "A . __eou__  __eou__",  # 3: empty utterance
        BAD_UTF8 + b" __eou__",  # 4
        "Bye . __eou__",
    )
    r = readers.read_dailydialog(path)
    assert [d.utterances for d in r.examples] == [["Hi , Jim .", "Hello !"], ["Bye ."]]
    assert_skipped(
        r, {readers.MISSING_EOU: 1, readers.EMPTY: 1, readers.INVALID_UTF8: 1}, [2, 3, 4]
    )
    assert_error_at(lambda: readers.read_dailydialog(path, "error"), path, 2, readers.MISSING_EOU)


def test_text_documents_by_blank_line_or_by_line(tmp_path):
    path = write(tmp_path / "t.txt", "First:", "Hello.", "", "", "Second:", BAD_UTF8, "Bye.", "")
    r = readers.read_text(path, "blank_line")
    assert [(d.text, d.line) for d in r.examples] == [("First:\nHello.", 1), ("Second:\nBye.", 5)]
    assert r.bad.positions == [f"{path}:6: {readers.INVALID_UTF8}"]
    by_line = readers.read_text(path, "line")
    assert [d.text for d in by_line.examples] == ["First:", "Hello.", "Second:", "Bye."]
    assert_error_at(
        lambda: readers.read_text(path, bad_lines="error"), path, 6, readers.INVALID_UTF8
    )


def test_filter_too_long_reports_file_lines(tsv):
    r = readers.read_parallel_tsv(tsv)  # examples on lines 2 and 6
    keep = readers.filter_too_long(r, np.array([[3, 9], [2, 4]]), max_len=8)
    assert keep.tolist() == [1]
    assert r.bad.counts[readers.TOO_LONG] == 1
    assert f"{tsv}:2: {readers.TOO_LONG} (9 > 8 tokens)" in r.bad.positions
    strict = readers.read_parallel_tsv(tsv)
    strict.bad.policy = "error"
    assert_error_at(
        lambda: readers.filter_too_long(strict, np.array([3, 9]), 8), tsv, 6, readers.TOO_LONG
    )


def test_bad_lines_merge():
    a, b = readers.BadLines(), readers.BadLines()
    for i in range(4):
        a.add("a", i, readers.EMPTY)
        b.add("b", i, readers.COLUMNS)
    a.merge(b)
    assert a.counts == {readers.EMPTY: 4, readers.COLUMNS: 4} and len(a.positions) == 5


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


def test_path_dataset_uses_suffix_or_format(tmp_path):
    tsv = write(tmp_path / "mine.tsv", "en\tfr", "a\tb")
    assert resolve_dataset(DataConfig(dataset=str(tsv))) == ("tsv", {"train": tsv})
    ner = write(tmp_path / "mine.data", "EU B-ORG", "")
    out = read_dataset(DataConfig(dataset=str(ner), format="conll"))
    assert out["train"].examples[0].tags == ["B-ORG"]
    write(tmp_path / "corpus.en", "hello")
    write(tmp_path / "corpus.fr", "bonjour")
    pairs = read_dataset(DataConfig(dataset=str(tmp_path / "corpus"), format="parallel"))
    assert pairs["train"].examples[0][:2] == ("hello", "bonjour")


def test_read_translation_pairs(tmp_path):
    tsv = write(tmp_path / "mine.tsv", "en\tfr", "a\tb", "broken")
    result, path = read_translation_pairs(DataConfig(dataset=str(tsv)))
    assert (
        path == tsv and [p[:2] for p in result.examples] == [("a", "b")] and result.bad.total == 1
    )
    write(tmp_path / "c.en", "hello")
    write(tmp_path / "c.fr", "bonjour")
    result, path = read_translation_pairs(
        DataConfig(dataset=str(tmp_path / "c"), format="parallel")
    )
    assert path == tmp_path / "c.en" and result.examples[0][:2] == ("hello", "bonjour")
    ner = write(tmp_path / "n.conll", "EU\tB-ORG")
    with pytest.raises(ConfigError, match="translation expects sentence pairs"):
        read_translation_pairs(DataConfig(dataset=str(ner)))


def test_registry_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'conll2003'"):
        resolve_dataset(DataConfig(dataset="conll2030"))
    with pytest.raises(ConfigError, match="data.format"):
        resolve_dataset(DataConfig(dataset=str(write(tmp_path / "x.bin", "z"))))
    with pytest.raises(ConfigError, match="did you mean 'jsonl'"):
        resolve_dataset(DataConfig(dataset=str(tmp_path / "x.bin"), format="jsonl2"))
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path))
    monkeypatch.setattr("trainformer.paths.REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match=r"en-fr/tatoeba.tsv.*looked in"):
        resolve_dataset(DataConfig(dataset="tatoeba-en-fr"))


def test_named_dataset_from_a_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path))
    (tmp_path / "ner" / "wnut17").mkdir(parents=True)
    for name in ("train", "dev", "test"):
        write(tmp_path / "ner" / "wnut17" / f"{name}.conll", f"{name}\tO", "")
    out = read_dataset(DataConfig(dataset="wnut17"))
    assert {k: v.examples[0].tokens for k, v in out.items()} == {
        "train": ["train"],
        "valid": ["dev"],
        "test": ["test"],
    }


# ----------------------------------------------------------------------------
# The shared datasets (skipped when absent)
# ----------------------------------------------------------------------------


def _have(name: str) -> bool:
    try:
        resolve_dataset(DataConfig(dataset=name))
    except DataError:
        return False
    return True


@pytest.mark.data
@pytest.mark.skipif(not _have("tatoeba-en-fr"), reason="shared Tatoeba data absent")
def test_real_tatoeba_counts():
    r = read_dataset(DataConfig(dataset="tatoeba-en-fr"))["train"]
    assert len(r) == 172_461 and r.bad.total == 0
    assert r.examples[0][:2] == ("Hi.", "Salut!")
    assert sum('"' in p.src for p in r.examples) > 0  # quotes did not break rows


@pytest.mark.data
@pytest.mark.skipif(not _have("conll2003"), reason="shared CoNLL-2003 data absent")
def test_real_conll_counts():
    out = read_dataset(DataConfig(dataset="conll2003"))
    sizes = {k: (len(v), sum(len(s.tokens) for s in v.examples)) for k, v in out.items()}
    assert sizes == {"train": (14_041, 203_621), "valid": (3_250, 51_362), "test": (3_453, 46_435)}
    starts = [t for s in out["train"].examples for t in s.tags if t.startswith("B-")]
    assert starts.count("B-PER") == 6600 and starts.count("B-LOC") == 7140


@pytest.mark.data
@pytest.mark.skipif(not _have("dailydialog"), reason="shared DailyDialog data absent")
def test_real_other_counts():
    dd = read_dataset(DataConfig(dataset="dailydialog"))
    assert {k: (len(v), sum(len(d.utterances) for d in v.examples)) for k, v in dd.items()} == {
        "train": (11_118, 87_171),
        "valid": (1_000, 8_069),
        "test": (1_000, 7_740),
    }
    assert {k: len(v) for k, v in read_dataset(DataConfig(dataset="wnut17")).items()} == {
        "train": 3_394,
        "valid": 1_009,
        "test": 1_287,
    }
    assert {k: len(v) for k, v in read_dataset(DataConfig(dataset="semeval2010")).items()} == {
        "train": 8_000,
        "test": 2_717,
    }
    text = find_data(DATASETS["tinyshakespeare"].files["train"]).read_text(encoding="utf-8")
    assert len(text) == 1_115_394

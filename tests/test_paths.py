"""Data-root resolution and its error message."""

import pytest

from trainformer import paths
from trainformer.errors import DataError


def test_env_data_root_wins(tmp_path, monkeypatch):
    (tmp_path / "en-fr").mkdir()
    (tmp_path / "en-fr" / "tatoeba.tsv").write_text("en\tfr\n")
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path))
    assert paths.data_roots()[0] == tmp_path
    assert paths.find_data("en-fr/tatoeba.tsv") == tmp_path / "en-fr" / "tatoeba.tsv"


def test_missing_data_lists_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path))
    with pytest.raises(DataError) as err:
        paths.find_data("nope/file.tsv")
    msg = str(err.value)
    assert "nope/file.tsv" in msg and "TRAINFORMER_DATA" in msg
    for root in paths.data_roots():
        assert str(root / "nope" / "file.tsv") in msg


def test_default_roots_order(monkeypatch):
    monkeypatch.delenv("TRAINFORMER_DATA", raising=False)
    roots = paths.data_roots()
    assert roots[0] == paths.REPO_ROOT.parent / "shared" / "data"
    assert roots[1].parts[-2:] == ("trainformer", "data")


def test_cache_dir_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_CACHE", str(tmp_path / "c"))
    d = paths.cache_dir("tokenizers")
    assert d.is_dir() and d.parent == tmp_path / "c"

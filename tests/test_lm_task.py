"""Language-model task: sources, leak-free splits, packed batches that resume, every token scored once."""

import json
import random

import numpy as np
import pytest
import torch

from trainformer.config import DataConfig, ModelConfig, from_dict
from trainformer.data.batching import IGNORE_INDEX
from trainformer.data.cache import Ragged
from trainformer.data.chat_template import CHAT_SPECIAL_TOKENS
from trainformer.data.packing import join_documents
from trainformer.errors import ConfigError
from trainformer.models import build_model
from trainformer.tasks import build_task
from trainformer.tasks.lm import (
    PackedBatches,
    causal_loss,
    document_key,
    eval_rows,
    perplexity,
    read_documents,
    row_batches,
)

WORDS = "the cat dog sat on a mat and ran to the big small red house tree".split()




def dailydialog_root(root, n_train=40):
    """A data root with DailyDialog's layout; valid/test lines are marked so leaks are visible."""
    rng = random.Random(0)
    base = root / "dialogue" / "dailydialog"
    for split, name in (("train", "train"), ("valid", "validation"), ("test", "test")):
        (base / name).mkdir(parents=True)
        n = n_train if split == "train" else 6
        lines = [" __eou__ ".join(f"{split} {i} says {' '.join(rng.choices(WORDS, k=4))} ." for _ in range(4))
                 + " __eou__" for i in range(n)]
        (base / name / f"dialogues_{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_text(path, n=120, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(5, 25))) for _ in range(n)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def lm_config(dataset, **data):
    return from_dict({
        "task": "lm", "model": {"family": "decoder", "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64,
                                "max_len": 64, "dropout": 0.0},
        "data": {"dataset": dataset, "tokenizer": {"kind": "byte_bpe", "vocab_size": 300, "min_frequency": 1},
                 "seq_len": 16, "max_tokens": 64, "valid_size": 10, "test_size": 10, **data},
        "train": {"device": "cpu", "precision": "fp32"},
    })


def test_sources_join_and_only_dailydialog_train_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFORMER_DATA", str(dailydialog_root(tmp_path / "data")))
    text = write_text(tmp_path / "a.txt", n=30)
    docs, files, report = read_documents(DataConfig(dataset=f"{text}+dailydialog"))
    assert len(docs) == 30 + 40 and len(files) == 2
    assert report["dailydialog"]["documents"] == 40
    assert not any("valid" in d or "test" in d for d in docs)  # never the evaluation dialogues
    assert docs[30].count("\n") == 3  # a dialogue is one document, an utterance a line
    assert docs[30].endswith("."), "detokenised: no space before the full stop"


def test_bad_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="joined by"):
        read_documents(DataConfig(dataset="a++b"))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("en\tfr\nhi\tsalut\n")
    with pytest.raises(ConfigError, match="language modelling reads text"):
        read_documents(DataConfig(dataset=str(tsv)))


def test_setup_splits_by_document_and_reserves_chat_tokens(tmp_path):
    path = write_text(tmp_path / "t.txt")
    path.write_text(path.read_text() + "\nThe Cat Sat\n\nthe  cat sat\n")  # case variants: one split
    task = build_task(lm_config(str(path)))
    task.setup(tmp_path / "run")
    tok = task.tokenizer
    assert all(tok.token_to_id(t) is not None for t in CHAT_SPECIAL_TOKENS)
    assert task.cfg.model.vocab_size == tok.vocab_size
    texts = {s: {document_key(tok.decode(d.tolist())) for d in task.docs[s].take(range(len(task.docs[s])))}
             for s in ("train", "valid", "test")}
    assert len(texts["valid"]) == 10 and len(texts["test"]) == 10
    assert not (texts["train"] & texts["valid"]) and not (texts["train"] & texts["test"])
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    assert report["splits"]["sizes"]["valid"] == 10 and report["tokens"]["train"] > 0


def test_packed_batches_shift_and_resume(tmp_path):
    task = build_task(lm_config(str(write_text(tmp_path / "t.txt"))))
    task.setup(None)
    batches = task.train_batches()
    assert isinstance(batches, PackedBatches)
    it = iter(batches)
    first = next(it)
    assert first["ids"].shape == (4, 16)  # max_tokens 64 / seq_len 16
    assert torch.equal(first["ids"][:, 1:], first["labels"][:, :-1])  # labels are the next tokens
    for _ in range(2):
        next(it)
    state = batches.state_dict()
    expected = next(it)
    again = task.train_batches()
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["ids"], expected["ids"])


def test_unpacked_batches_pad_without_loss(tmp_path):
    task = build_task(lm_config(str(write_text(tmp_path / "t.txt")), pack=False))
    task.setup(None)
    batch = next(iter(task.train_batches()))
    assert (batch["labels"][~batch["mask"]] == IGNORE_INDEX).all()
    assert task.batch_tokens(batch) == int(batch["mask"].sum())


def test_eval_rows_score_every_token_once():
    docs = Ragged.from_lists([[5, 6, 7], [8, 9], list(range(10, 40))])
    stream, _ = join_documents(docs, 3)
    for seq_len in (4, 7, 64):
        rows = eval_rows(docs, seq_len, sep_id=3)
        labels = rows["labels"].reshape(-1)
        assert labels[labels != IGNORE_INDEX].tolist() == stream[1:].tolist()
        assert rows["doc_ids"].min() == 0


def test_perplexity_does_not_depend_on_batching(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="decoder", vocab_size=50, d_model=32, n_heads=2, n_layers=1,
                                    d_ff=64, max_len=32, dropout=0.0)).eval()
    docs = Ragged.from_lists([list(np.random.default_rng(i).integers(7, 50, size=13 + i)) for i in range(5)])
    rows = eval_rows(docs, 16)
    with torch.no_grad():
        scores = [perplexity(lambda b: causal_loss(model, b), row_batches(rows, k), torch.device("cpu"))
                  for k in (1, 3, 100)]
    assert scores[0]["tokens"] == int(docs.lengths().sum()) + len(docs) - 1
    for s in scores[1:]:
        assert s["tokens"] == scores[0]["tokens"] and s["loss"] == pytest.approx(scores[0]["loss"], rel=1e-5)
    assert scores[0]["ppl"] == pytest.approx(np.exp(scores[0]["loss"]))
    assert 25 < scores[0]["ppl"] < 100  # an untrained model is near uniform over 50 tokens


def test_seq_len_longer_than_model_window_is_rejected(tmp_path):
    cfg = lm_config(str(write_text(tmp_path / "t.txt")), seq_len=128)
    with pytest.raises(ConfigError, match="data.seq_len"):
        build_task(cfg).setup(None)

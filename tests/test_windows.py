"""Context windows for tagging: consecutive sentences packed into one encoder row, with
the loss and the decoding still per sentence (`trainformer.data.windows`)."""

import json

import numpy as np
import pytest
import torch

from trainformer.config import from_dict
from trainformer.data.batching import IGNORE_INDEX, collate_tagging
from trainformer.data.cache import Ragged, TokenStore
from trainformer.data.chars import word_bytes
from trainformer.data.windows import join_sentences, window_groups, window_store
from trainformer.errors import ConfigError
from trainformer.inference.bio import bio_labels
from trainformer.inference.crf import crf_nll, words_of

LABELS = bio_labels(["PER", "LOC"])
NO = IGNORE_INDEX


def test_window_groups_are_consecutive_within_budget_and_cover_everything():
    lengths = [3, 4, 2, 9, 1, 1, 30, 2]
    groups = window_groups(lengths, budget=12)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # each once, in order
    for g in groups:
        used = 1 + sum(lengths[i] + 1 for i in g)  # <cls>, each sentence and its <sep>
        assert used <= 12 or len(g) == 1  # only a sentence too long on its own exceeds it
    assert groups == [[0, 1], [2], [3], [4, 5], [6], [7]]  # 1 + 4 + 5 = 10; + 3 would be 13
    assert window_groups(lengths, budget=2) == [[i] for i in range(len(lengths))]


def test_join_sentences_puts_separators_and_continues_word_indexes():
    ids, words = join_sentences([[7, 8, 9], [5], [4, 4]], [[0, 1, 1], [0], [0, 1]], [2, 1, 2], sep_id=3)
    assert ids.tolist() == [7, 8, 9, 3, 5, 3, 4, 4]
    assert words.tolist() == [0, 1, 1, -1, 2, -1, 3, 4]
    # a sentence whose last word has no subword still shifts the next one by its word count
    _, words = join_sentences([[7], [5]], [[0], [0]], [2, 1], sep_id=3)
    assert words.tolist() == [0, -1, 2]


def test_collate_windows_labels_words_not_separators_and_numbers_sentences():
    # row 0: sentence [a, bc] + sentence [d]; row 1: sentence [e]
    (ids0, w0), (ids1, w1) = (join_sentences([[7, 8, 9], [5]], [[0, 1, 1], [0]], [2, 1], 3),
                              join_sentences([[6]], [[0]], [1], 3))
    chars = [np.concatenate([word_bytes(["a", "bc"]), word_bytes(["d"])]), word_bytes(["e"])]
    batch = collate_tagging([ids0, ids1], [w0, w1], [[1, 2, 3], [4]], pad_id=0, cls_id=1, sep_id=3,
                            word_chars_list=chars, sentence_words_list=[[2, 1], [1]])
    assert batch["ids"].tolist() == [[1, 7, 8, 9, 3, 5, 3], [1, 6, 3, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[NO, 1, 2, NO, NO, 3, NO], [NO, 4, NO, NO, NO, NO, NO]]
    assert batch["sentence"].tolist() == [[-1, 0, 0, 0, -1, 1, -1], [-1, 2, -1, -1, -1, -1, -1]]
    assert not batch["chars"][0, 4].any()  # the separator has no bytes
    assert batch["chars"][0, 5].tolist() == word_bytes(["d"])[0].tolist()


def test_a_window_batch_has_the_crf_loss_of_its_sentences_apart():
    """The same per-word scores, once packed two sentences to a row with separators and once
    one sentence per row: words_of + crf_nll must give the same sentences and the same loss."""
    torch.manual_seed(0)
    n_words = [3, 2, 4, 1]
    tags = [torch.randint(0, len(LABELS), (n,)) for n in n_words]
    emissions = [torch.randn(n, len(LABELS)) for n in n_words]
    start, trans = torch.randn(len(LABELS)), torch.randn(len(LABELS), len(LABELS))

    def batch_of(rows):  # rows: lists of sentence numbers -> (logits, labels, sentence)
        width = max(1 + sum(n_words[k] + 1 for k in row) for row in rows)
        logits = torch.randn(len(rows), width, len(LABELS))  # noise where no word starts
        labels = torch.full((len(rows), width), NO)
        sentence = torch.full((len(rows), width), -1)
        number = 0
        for r, row in enumerate(rows):
            pos = 1
            for k in row:
                logits[r, pos : pos + n_words[k]] = emissions[k]
                labels[r, pos : pos + n_words[k]] = tags[k]
                sentence[r, pos : pos + n_words[k]] = number
                pos, number = pos + n_words[k] + 1, number + 1
        return logits, labels, sentence

    apart = words_of(*batch_of([[0], [1], [2], [3]])[:2])
    packed = words_of(*batch_of([[0, 1], [2, 3]]))
    for a, b in zip(apart, packed):
        assert torch.equal(a, b)
    assert float(crf_nll(*packed, start, trans, LABELS)) == pytest.approx(float(crf_nll(*apart, start, trans, LABELS)))


def test_window_store_packs_rows_in_order_and_keeps_their_words():
    sentences = [[[7, 8], [0, 0], [1]], [[5], [0], [2]], [[6, 6, 6], [0, 1, 2], [3, 4, 0]]]  # ids, word_ids, tags
    store = TokenStore({"ids": Ragged.from_lists([s[0] for s in sentences]),
                        "word_ids": Ragged.from_lists([s[1] for s in sentences]),
                        "tags": Ragged.from_lists([s[2] for s in sentences])})
    packed = window_store(store, np.array([0, 1, 2]), budget=7, sep_id=3)
    assert len(packed) == 2
    assert packed["ids"][0].tolist() == [7, 8, 3, 5] and packed["word_ids"][0].tolist() == [0, 0, -1, 1]
    assert packed["tags"][0].tolist() == [1, 2] and packed["sentence_words"][0].tolist() == [1, 1]
    assert packed["ids"][1].tolist() == [6, 6, 6] and packed["tags"][1].tolist() == [3, 4, 0]
    only_last = window_store(store, np.array([2]), budget=64, sep_id=3)
    assert len(only_last) == 1 and only_last["sentence_words"][0].tolist() == [3]


def test_context_window_config_is_checked():
    with pytest.raises(ConfigError, match="data.context_window: only tagging tasks"):
        from_dict({"task": "relations", "model": {"family": "encoder", "head": "relation"},
                   "data": {"context_window": 64}})
    with pytest.raises(ConfigError, match="data.context_window: expected at most"):
        from_dict({"task": "ner", "model": {"family": "encoder", "head": "tagging", "max_len": 128},
                   "data": {"context_window": 512, "max_len": 512}})


# ----------------------------------------------------------------------------
# A tiny task that only the neighbouring sentence can solve
# ----------------------------------------------------------------------------

NAMES = ["Jordan", "Georgia", "Chelsea", "Victoria", "Florence", "Sydney", "Austin", "Lima"]
FILL = ["the", "a", "report", "said", "today", "that", "met", "with", "friends", "new", "old"]


def two_sentence_docs(n: int, seed: int) -> str:
    """CoNLL text of n documents: "... about sport ." / "... about travel .", then a sentence
    whose name is B-PER after sport and B-LOC after travel: the label is not in its own sentence."""
    import random

    rng = random.Random(seed)
    blocks = []
    for _ in range(n):
        topic = rng.choice(["sport", "travel"])
        first = [*rng.sample(FILL, rng.randint(1, 3)), "about", topic, "."]
        fill = rng.sample(FILL, rng.randint(1, 4))
        cut = rng.randint(0, len(fill))
        second = [*fill[:cut], rng.choice(NAMES), *fill[cut:], "."]
        tags = ["O"] * cut + ["B-PER" if topic == "sport" else "B-LOC"] + ["O"] * (len(fill) - cut + 1)
        blocks.append("".join(f"{w}\tO\n" for w in first))
        blocks.append("".join(f"{w}\t{t}\n" for w, t in zip(second, tags)))
    return "\n".join(blocks)


@pytest.mark.slow
def test_a_context_window_lets_the_tagger_use_the_previous_sentence(tmp_path, monkeypatch, capsys):
    from trainformer.cli import main
    from trainformer.data.registry import DATASETS, DatasetSpec
    from trainformer.inference.loading import load_tagger

    files = {}
    for split, (n, seed) in {"train": (600, 0), "valid": (40, 1), "test": (60, 2)}.items():
        files[split] = tmp_path / f"{split}.conll"
        files[split].write_text(two_sentence_docs(n, seed), encoding="utf-8")
    monkeypatch.setitem(DATASETS, "tiny-docs", DatasetSpec("conll", {k: str(v) for k, v in files.items()}))

    def train(window: int) -> dict:
        recipe = tmp_path / f"ctx{window}.yaml"
        recipe.write_text(
            "task: ner\ndescription: tiny\n"
            "model: {family: encoder, d_model: 32, n_heads: 2, n_layers: 2, d_ff: 64, max_len: 64, position: rope,"
            " dropout: 0.0, head: tagging, crf: true}\n"
            "data: {dataset: tiny-docs, tokenizer: {kind: wordpiece, vocab_size: 100, min_frequency: 1},"
            f" max_tokens: 512, context_window: {window}}}\n"
            "optim: {lr: 0.005, warmup_steps: 5, schedule: linear}\n"
            "train: {precision: fp32, device: cpu, threads: 1, progress: false, log_every: 50, eval_every: 0,"
            " ckpt_every: 0, label_smoothing: 0.0, max_steps: 150}\n", encoding="utf-8")
        assert main(["train", str(recipe), "--out", str(tmp_path / f"run{window}")]) == 0
        return json.loads((tmp_path / f"run{window}" / "summary.json").read_text())

    # the sentence alone says nothing about the type: a coin flip without a window
    assert train(0)["test"]["f1"] <= 65
    # its neighbour does. Windows start wherever the packing puts them, so a few names lose
    # their context sentence.
    summary = train(48)
    assert summary["test"]["f1"] >= 85, summary["test"]
    assert json.loads((tmp_path / "run48" / "data.json").read_text())["train_windows"] < 1200

    tagger = load_tagger(tmp_path / "run48" / "model", device="cpu")
    assert tagger.context_window == 48
    lines = ["friends said about sport .", "Jordan met with friends .", "a report about travel .",
             "Jordan met with friends ."]  # words of the training data only
    got = [[(e["type"], e["text"]) for e in r["entities"]] for r in tagger.extract(lines)]
    assert got == [[], [("PER", "Jordan")], [], [("LOC", "Jordan")]]
    # `trainformer extract` reads its input lines in order, as one document
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()  # drop the training's output
    assert main(["extract", str(tmp_path / "run48" / "model"), "--input", str(inp)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [[(e["type"], e["text"]) for e in r["entities"]] for r in rows] == got

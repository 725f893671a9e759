"""MLM pretraining pieces: 80/10/10 masking, resumable masked batches, the sparse head, no test text."""

import numpy as np
import pytest
import torch

from trainformer.config import DataConfig, from_dict, load_recipe
from trainformer.data.batching import IGNORE_INDEX, TokenBudgetSampler
from trainformer.data.cache import Ragged
from trainformer.data.splits import make_splits
from trainformer.data.tokenizer import MASK_ID, PAD_ID, SEP_ID
from trainformer.models import build_model
from trainformer.tasks.mlm import MaskedBatches, mask_tokens, mlm_logits, mlm_texts, packed_rows
from trainformer.tasks.translation import split_key

LO, HI = 7, 1000


def test_masking_is_15_percent_with_80_10_10():
    rng = np.random.default_rng(0)
    ids = rng.integers(LO, HI, size=(200, 500))
    ids[:, -50:] = PAD_ID  # specials are never chosen
    ids[:, 0] = SEP_ID
    inputs, labels = mask_tokens(ids, 0.15, LO, HI, rng)
    chosen = labels != IGNORE_INDEX
    ordinary = (ids >= LO) & (ids < HI)
    assert not chosen[~ordinary].any()
    assert chosen.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.005)
    assert (labels[chosen] == ids[chosen]).all()
    masked = (inputs == MASK_ID) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.01)
    # a random replacement equals the original 1 time in ~1000; count it with the kept ones
    assert kept.sum() / n == pytest.approx(0.1, abs=0.01)
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.01)
    assert ((inputs[replaced] >= LO) & (inputs[replaced] < HI)).all()
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_packed_rows_are_full_and_keep_every_token_once():
    docs = Ragged.from_lists([[10, 11, 12], [13], [14, 15, 16, 17], [18, 19]])
    rows = packed_rows(docs, 4)
    assert rows.to_lists() == [[10, 11, 12, SEP_ID], [13, SEP_ID, 14, 15], [16, 17, SEP_ID, 18]]


def _batches(rows: Ragged, seed: int = 3) -> MaskedBatches:
    sampler = TokenBudgetSampler(rows.lengths(), max_tokens=16, seed=seed)
    return MaskedBatches(sampler, rows, 0.3, LO, HI)


def test_masked_batches_resume_exactly():
    rng = np.random.default_rng(0)
    rows = Ragged.from_lists([rng.integers(LO, HI, size=8).tolist() for _ in range(10)])
    straight = _batches(rows)
    it = iter(straight)
    first = [next(it) for _ in range(8)]  # 5 batches of 2 rows per epoch: crosses into epoch 1
    resumed = _batches(rows)
    it2 = iter(resumed)
    [next(it2) for _ in range(4)]
    state = resumed.state_dict()
    again = _batches(rows)
    again.load_state_dict(state)
    it3 = iter(again)
    for expected in first[4:]:
        got = next(it3)
        for key in ("ids", "mask", "labels"):
            assert torch.equal(got[key], expected[key]), key
    # the masking differs between batches (drawn per batch, not fixed per row)
    assert not torch.equal(first[0]["labels"] != -100, first[1]["labels"] != -100)


def test_sparse_mlm_head_equals_full_forward():
    cfg = from_dict({"model": {"preset": "tiny-encoder", "head": "mlm", "vocab_size": 50, "dropout": 0.0}})
    model = build_model(cfg.model).eval()
    ids = torch.randint(7, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    chosen = torch.rand(3, 9) < 0.4
    chosen[0, 0] = True
    sparse = mlm_logits(model, ids, mask, chosen)
    full = model(ids, mask)[chosen]
    assert sparse.shape == (int(chosen.sum()), 50)
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)


def test_mfu_flops_count_the_head_only_where_it_runs():
    """6 x the multiplied weights: embedding tables are lookups; the tied MLM head
    projects only the masked share; a tagging head never touches the vocabulary."""
    from trainformer.tasks.mlm import MaskedLMTask
    from trainformer.tasks.tagging import TaggingTask

    cfg = from_dict({"task": "mlm", "model": {"preset": "tiny-encoder", "head": "mlm", "vocab_size": 500},
                     "data": {"mlm_probability": 0.2}})
    model = build_model(cfg.model)
    tables = model.tok_embed.weight.numel() + model.pos_embed.weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - tables
    assert MaskedLMTask(cfg).flops_per_token(model) == pytest.approx(6 * (dense + 0.2 * 500 * cfg.model.d_model))
    tag = from_dict({"task": "ner", "model": {"preset": "tiny-encoder", "head": "tagging", "vocab_size": 500,
                                              "num_labels": 9}})
    tagger = build_model(tag.model)
    dense = sum(p.numel() for p in tagger.parameters()) - tables
    assert TaggingTask(tag).flops_per_token(tagger) == pytest.approx(6 * dense)


# ----------------------------------------------------------------------------
# Which text MLM reads: train files / the translation train split only
# ----------------------------------------------------------------------------


def _write_conll(path, sentences):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("".join(f"{w} NN O O\n" for w in s.split()) + "\n" for s in sentences))


def test_mlm_text_never_includes_valid_or_test(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for split in ("train", "valid", "test"):
        _write_conll(root / "ner/conll2003" / f"{split}.txt", [f"{split} sentence {i} ." for i in range(5)])
    sem = root / "relations/semeval2010_task8"
    sem.mkdir(parents=True)
    for split in ("train", "test"):
        (sem / f"{split}.tsv").write_text(
            "id\tsentence\trelation\n"
            + "".join(f"{i}\tThe <e1>{split}</e1> hit <e2>wall {i}</e2> .\tOther\n" for i in range(1, 6)))
    pairs = [(f"English sentence number {i} .", f"Phrase {i} .") for i in range(300)]
    (root / "en-fr").mkdir()
    (root / "en-fr/tatoeba.tsv").write_text("en\tfr\n" + "".join(f"{e}\t{f}\n" for e, f in pairs))
    monkeypatch.setenv("TRAINFORMER_DATA", str(root))

    texts, report = mlm_texts(DataConfig(dataset="conll2003+semeval2010+tatoeba-en-fr"))
    joined = "\n".join(texts)
    assert "valid sentence" not in joined and "test sentence" not in joined
    assert "train sentence 3 ." in texts
    assert "The train hit wall 1 ." in texts and "<e1>" not in joined and "The test hit" not in joined
    # Tatoeba: exactly the translation recipe's train split (its valid and test groups left out)
    t = load_recipe("translate-en-fr").data
    splits = make_splits(pairs, [split_key(e) for e, _ in pairs], t.valid_size, t.test_size, t.split_seed)
    assert len(splits.test) and len(splits.valid)
    english = {e for e in texts if e.startswith("English")}
    assert english == {pairs[i][0] for i in splits.train}
    assert report["tatoeba-en-fr"]["texts"] == len(splits.train)

"""IE helpers without training: BIO decoding, word offsets, entity markers, the SemEval score."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainformer.config import ModelConfig, TokenizerConfig, from_dict
from trainformer.data.batching import collate_relations
from trainformer.data.markers import add_marker_tokens, marker_positions, window_keeping
from trainformer.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, UNK_ID, train_tokenizer
from trainformer.data.windows import per_subword
from trainformer.errors import ConfigError, UserError
from trainformer.inference.bio import (
    TransitionPrior,
    bio_labels,
    bio_spans,
    is_valid_bio,
    to_bio,
    viterbi_bio,
)
from trainformer.inference.crf import crf_nll, words_of
from trainformer.inference.relations import RelationClassifier
from trainformer.inference.tagger import entity_dicts, split_words
from trainformer.models import build_model
from trainformer.models.heads import span_mean
from trainformer.tasks.relations import relation_labels, relation_type, semeval_scores
from trainformer.tasks.tagging import drop_words

LABELS = bio_labels(["PER", "LOC"])  # O, B-LOC, I-LOC, B-PER, I-PER


# ----------------------------------------------------------------------------
# BIO
# ----------------------------------------------------------------------------


def test_to_bio_repairs_iob1_and_bioes():
    assert to_bio(["I-PER", "I-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "O", "B-LOC"]  # IOB1
    assert to_bio(["B-PER", "I-LOC"]) == ["B-PER", "B-LOC"]  # a type change starts an entity
    assert to_bio(["S-PER", "B-LOC", "E-LOC"]) == ["B-PER", "B-LOC", "I-LOC"]  # BIOES
    bio = ["O", "B-PER", "I-PER", "B-PER", "O"]
    assert to_bio(bio) == bio


def _score(scores: torch.Tensor, path: list[int]) -> float:
    return float(sum(scores[t, k] for t, k in enumerate(path)))


def test_viterbi_is_valid_and_optimal_on_adversarial_logits():
    """Logits that push I- tags everywhere: the decoder returns the best *valid* sequence."""
    gen = torch.Generator().manual_seed(0)
    n_words, n_labels = 5, len(LABELS)
    valid = [p for p in itertools.product(range(n_labels), repeat=n_words)
             if is_valid_bio([LABELS[k] for k in p])]
    inside = torch.tensor([lab.startswith("I-") for lab in LABELS])
    for trial in range(20):
        scores = torch.randn(1, n_words, n_labels, generator=gen) * 3
        scores[..., inside] += 4.0  # argmax is almost always an invalid I- tag
        path = viterbi_bio(scores, torch.tensor([n_words]), LABELS)[0]
        assert is_valid_bio([LABELS[k] for k in path])
        best = max(_score(scores[0], p) for p in valid)  # exhaustive search
        assert _score(scores[0], path) == pytest.approx(best, abs=1e-4), trial
    argmax = scores[0].argmax(-1).tolist()
    assert not is_valid_bio([LABELS[k] for k in argmax])  # the test really was adversarial


def test_viterbi_padding_does_not_change_a_sentence():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 7, len(LABELS), generator=gen)
    lengths = torch.tensor([7, 3, 1])
    batched = viterbi_bio(scores, lengths, LABELS)
    for b in range(3):
        alone = viterbi_bio(scores[b : b + 1, : lengths[b]], lengths[b : b + 1], LABELS)[0]
        assert batched[b] == alone and len(alone) == lengths[b]


def test_bio_spans():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert bio_spans(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6)]


# ----------------------------------------------------------------------------
# CRF
# ----------------------------------------------------------------------------


def _brute_force_nll(scores, tags, start, trans):
    """-log P(tags) by enumerating every valid BIO path of one sentence."""
    def path_score(path):
        return float(start[path[0]] + sum(scores[i, k] for i, k in enumerate(path))
                     + sum(trans[a, b] for a, b in zip(path[:-1], path[1:])))
    paths = [p for p in itertools.product(range(len(LABELS)), repeat=len(tags))
             if is_valid_bio([LABELS[k] for k in p])]
    log_z = torch.logsumexp(torch.tensor([path_score(p) for p in paths]), dim=0)
    return float(log_z) - path_score(tags)


def test_crf_nll_equals_the_sum_over_every_valid_path():
    torch.manual_seed(0)
    scores, start, trans = torch.randn(3, 4, 5), torch.randn(5), torch.randn(5, 5)
    tags = torch.tensor([[3, 4, 0, 1], [1, 2, 2, 0], [0, 3, 0, 0]])
    lengths = torch.tensor([4, 3, 2])  # rows 2 and 3 are padded; padding must add nothing
    got = crf_nll(scores, tags, lengths, start, trans, LABELS)
    want = sum(_brute_force_nll(scores[b, :n], tags[b, :n].tolist(), start, trans)
               for b, n in enumerate(lengths.tolist()))
    assert float(got) == pytest.approx(want, rel=1e-5)
    empty = crf_nll(scores[:1], tags[:1], torch.tensor([0]), start, trans, LABELS)
    assert float(empty) == 0.0


def test_crf_gradient_descent_learns_that_i_per_follows_b_per():
    """Emissions that cannot tell B-PER from I-PER on the second word: only the learned
    transitions can, and a few steps of descent on the CRF loss learn them."""
    start = torch.zeros(5, requires_grad=True)
    trans = torch.zeros(5, 5, requires_grad=True)
    scores = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0]])[None]  # (1, 2, 5)
    tags, lengths = torch.tensor([[3, 4]]), torch.tensor([2])
    opt = torch.optim.SGD([start, trans], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        crf_nll(scores, tags, lengths, start, trans, LABELS).backward()
        opt.step()
    assert trans[3, 4] > trans[3, 3]
    prior = TransitionPrior(start.detach(), trans.detach(), 1.0)
    assert viterbi_bio(scores, lengths, LABELS) == [[3, 3]]  # a tie broken the wrong way without it
    assert viterbi_bio(scores, lengths, LABELS, prior) == [[3, 4]]


def test_words_of_moves_first_subword_scores_to_words():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    labels = torch.tensor([[-100, 2, -100, 1, -100], [-100, 0, 1, 2, -100]])  # <cls> w0 ## w1 <sep> / 3 words
    scores, tags, lengths = words_of(logits, labels)
    assert lengths.tolist() == [2, 3] and tags.tolist() == [[2, 1, 0], [0, 1, 2]]
    assert torch.equal(scores[0, :2], logits[0, [1, 3]]) and torch.equal(scores[1], logits[1, 1:4])
    assert torch.equal(scores[0, 2], torch.zeros(3))


def test_crf_config_is_checked():
    with pytest.raises(ConfigError, match="model.crf: only the tagging head"):
        from_dict({"task": "relations", "model": {"family": "encoder", "head": "relation", "crf": True}})
    with pytest.raises(ConfigError, match="eval.transition_weight: weighs the counted tag prior"):
        from_dict({"task": "ner", "model": {"family": "encoder", "head": "tagging", "crf": True},
                   "eval": {"transition_weight": 0.5}})
    with pytest.raises(ConfigError, match="parallel.strategy: ddp"):
        from_dict({"task": "ner", "model": {"family": "encoder", "head": "tagging", "crf": True},
                   "parallel": {"strategy": "fsdp"}})


def _drop_ids(ids, labels, p):
    return drop_words({"ids": ids, "labels": labels}, p)["ids"]


def test_word_dropout_hides_whole_words_and_nothing_else():
    # <cls> w0 w0## w1 w2 w2## w2## <sep> <pad>
    ids = torch.tensor([[CLS_ID, 10, 11, 12, 13, 14, 15, SEP_ID, PAD_ID]])
    labels = torch.tensor([[-100, 1, -100, 2, 3, -100, -100, -100, -100]])
    torch.manual_seed(0)
    seen = {tuple(_drop_ids(ids, labels, 0.5)[0].tolist()) for _ in range(200)}
    words = [(10, 11), (12,), (13, 14, 15)]
    expected = {(CLS_ID, *itertools.chain(*[(UNK_ID,) * len(w) if d else w for w, d in zip(words, hide)]),
                 SEP_ID, PAD_ID) for hide in itertools.product([False, True], repeat=3)}
    assert seen == expected  # every subset of words, each hidden whole
    assert torch.equal(_drop_ids(ids, labels, 0.0), ids)
    big = torch.randint(7, 50, (64, 40))
    rate = (_drop_ids(big, torch.zeros_like(big), 0.2) == UNK_ID).float().mean().item()
    assert 0.17 < rate < 0.23


def test_word_dropout_hides_the_dropped_words_characters_too():
    ids = torch.tensor([[CLS_ID, 10, 11, 12, SEP_ID]])
    labels = torch.tensor([[-100, 1, -100, 2, -100]])
    chars = torch.randint(1, 200, (1, 5, 4))
    torch.manual_seed(0)
    for _ in range(50):
        out = drop_words({"ids": ids, "labels": labels, "chars": chars}, 0.5)
        hidden = out["ids"][0] == UNK_ID  # (S,)
        assert torch.equal(out["chars"][0][hidden], torch.zeros_like(chars[0][hidden]))
        assert torch.equal(out["chars"][0][~hidden], chars[0][~hidden])


def test_rare_word_dropout_hides_only_rare_words_and_keeps_their_characters():
    # <cls> w0 w0## w1 w2 <sep> <pad>: w0 and w2 occur once in training, w1 often
    word_ids = [np.array([0, 0, 1, 2])]
    rare = torch.from_numpy(per_subword(word_ids, [np.array([1, 0, 1])], 7, start=1, fill=0).astype(bool))
    assert rare.tolist() == [[False, True, True, False, True, False, False]]
    ids = torch.tensor([[CLS_ID, 10, 11, 12, 13, SEP_ID, PAD_ID]])
    labels = torch.tensor([[-100, 1, -100, 2, 3, -100, -100]])
    chars = torch.randint(1, 200, (1, 7, 4))
    torch.manual_seed(0)
    seen = set()
    for _ in range(100):
        out = drop_words({"ids": ids, "labels": labels, "chars": chars}, 0.5, only=rare, keep_chars=True)
        seen.add(tuple(out["ids"][0].tolist()))
        assert torch.equal(out["chars"], chars)  # the characters stay: the model learns to read them
    words = {(10, 11): True, (12,): False, (13,): True}
    expected = {(CLS_ID, *itertools.chain(*[(UNK_ID,) * len(w) if r and d else w for (w, r), d in zip(words.items(), hide)]),
                 SEP_ID, PAD_ID) for hide in itertools.product([False, True], repeat=3)}
    assert seen == expected  # w1 is never hidden; w0 (whole) and w2 are, in every combination
    # a separator between two windowed sentences (word -1) is no word
    assert per_subword([np.array([0, -1, 1])], [np.array([1, 1])], 5, start=1, fill=0).tolist() == [[0, 1, 0, 1, 0]]


def test_relation_head_can_pool_the_tokens_between_the_markers():
    h = torch.randn(3, 6, 4)  # (B, S, D)
    means = span_mean(h, torch.tensor([1, 2, 3]), torch.tensor([4, 3, 3]))
    assert torch.allclose(means[0], h[0, 1:4].mean(0)) and torch.allclose(means[1], h[1, 2])
    assert torch.equal(means[2], torch.zeros(4))  # adjacent markers: nothing between
    cfg = dict(family="encoder", head="relation", vocab_size=30, d_model=8, n_heads=2, n_layers=1, d_ff=16,
               num_labels=5, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg, relation_pool="start_between")).eval()
    assert model.head.dense.in_features == 24
    ids = torch.randint(7, 30, (2, 9))
    e1, e2 = torch.tensor([1, 2]), torch.tensor([5, 3])
    mask = torch.ones_like(ids, dtype=torch.bool)
    h = model.hidden(ids, mask)  # (B, S, D)
    pair = torch.cat([h[[0, 1], e1], h[[0, 1], e2], torch.stack([h[0, 2:5].mean(0), h[1, 3:3].sum(0)])], -1)
    head = model.head
    assert torch.allclose(model(ids, mask, e1, e2), head.proj(F.gelu(head.dense(pair))), atol=1e-6)
    with pytest.raises(ConfigError, match="model.relation_pool: only the relation head"):
        from_dict({"task": "ner", "model": {"family": "encoder", "head": "tagging",
                                            "relation_pool": "start_between"}})


def test_word_dropout_config_is_checked():
    with pytest.raises(ConfigError, match="data.word_dropout: only tagging"):
        from_dict({"task": "relations", "model": {"family": "encoder", "head": "relation"},
                   "data": {"word_dropout": 0.1}})
    with pytest.raises(ConfigError, match="data.rare_word_dropout: only tagging"):
        from_dict({"task": "relations", "model": {"family": "encoder", "head": "relation"},
                   "data": {"rare_word_dropout": 0.5}})
    with pytest.raises(ConfigError, match=r"data.word_dropout: expected a number in \[0, 1\)"):
        from_dict({"task": "ner", "model": {"family": "encoder", "head": "tagging"},
                   "data": {"word_dropout": 1.0}})


# ----------------------------------------------------------------------------
# Words and character offsets
# ----------------------------------------------------------------------------


def test_split_words_offsets_on_tricky_text():
    text = "Zoë Müller (U.S.) met O'Neill, Jean-Pierre & Germany's team… 🙂 twice!"
    words = split_words(text)
    assert all(text[s:e] == w for w, s, e in words)
    got = [w for w, _, _ in words]
    assert got == ["Zoë", "Müller", "(", "U.S.", ")", "met", "O'Neill", ",", "Jean-Pierre", "&",
                   "Germany", "'s", "team", "…", "🙂", "twice", "!"]


def test_entity_offsets_point_into_the_original_line():
    text = "Paris and Paris, said Zoë  Müller."  # repeated string, punctuation, unicode, two spaces
    words = split_words(text)
    tags = ["B-LOC", "O", "B-LOC", "O", "O", "B-PER", "I-PER", "O"]
    assert len(words) == len(tags)
    ents = entity_dicts(text, words, tags)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in ents] == [
        ("LOC", "Paris", 0, 5), ("LOC", "Paris", 10, 15), ("PER", "Zoë  Müller", 22, 33)]
    assert all(text[e["start"] : e["end"]] == e["text"] for e in ents)


# ----------------------------------------------------------------------------
# Entity markers and relation labels
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The storm caused the flood .", "The wheel is part of the car ."] * 20
    return train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=80, min_frequency=1))


def test_markers_are_single_tokens_found_after_tokenisation(tokenizer):
    size = tokenizer.vocab_size
    e1, e2 = add_marker_tokens(tokenizer)
    assert tokenizer.vocab_size == size + 4
    assert add_marker_tokens(tokenizer) == (e1, e2) and tokenizer.vocab_size == size + 4  # idempotent
    ids = tokenizer.encode("The<e2>wheel</e2> is part of the <e1>car</e1>.")  # no spaces around some
    p1, p2 = marker_positions(ids, e1, e2)
    assert p2 < p1  # e2 comes first here
    assert tokenizer.id_to_token(ids[p2 + 1]) == "wheel" and tokenizer.id_to_token(ids[p1 + 1]) == "car"
    assert tokenizer.id_to_token(ids[p1 + 2]) == "</e1>"
    assert marker_positions([1, 2, 3], e1, e2) == (-1, -1)


def test_relation_batch_points_at_the_start_markers(tokenizer):
    e1, e2 = add_marker_tokens(tokenizer)
    sentences = ["The <e1>storm</e1> caused the <e2>flood</e2> .", "The <e2>wheel</e2> is part of the <e1>car</e1> ."]
    rows = {"ids": [np.asarray(tokenizer.encode(s)) for s in sentences], "label": [np.array([3]), np.array([0])]}
    batch = collate_relations(rows, e1, e2)  # <cls> is prepended: positions shift by one
    rows_idx = torch.arange(2)
    assert (batch["ids"][rows_idx, batch["e1_pos"]] == e1).all()
    assert (batch["ids"][rows_idx, batch["e2_pos"]] == e2).all()
    assert batch["e1_pos"][0] < batch["e2_pos"][0] and batch["e2_pos"][1] < batch["e1_pos"][1]
    assert batch["labels"].tolist() == [3, 0] and batch["mask"].sum(1).tolist() == [len(r) + 2 for r in rows["ids"]]


def test_an_ensemble_averages_its_members_distributions(tokenizer):
    e1, e2 = add_marker_tokens(tokenizer)
    labels = relation_labels(["Cause-Effect(e1,e2)", "Component-Whole(e1,e2)"])
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build_model(ModelConfig(
            family="encoder", head="relation", vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=1,
            d_ff=32, num_labels=len(labels), dropout=0.0)).eval())
    sents = ["The <e1>storm</e1> caused the <e2>flood</e2> .", "The <e2>wheel</e2> is part of the <e1>car</e1> ."]
    t = collate_relations({"ids": [np.asarray(tokenizer.encode(s)) for s in sents], "label": [np.zeros(1)] * 2},
                          e1, e2)
    with torch.no_grad():
        probs = [torch.softmax(m(t["ids"], t["mask"], t["e1_pos"], t["e2_pos"]), -1) for m in members]
    mean = (probs[0] + probs[1]) / 2
    got = RelationClassifier(members, tokenizer, labels, max_len=64, precision="fp32").predict(sents)
    assert got == [(labels[int(r.argmax())], pytest.approx(float(r.max()))) for r in mean]
    assert got != RelationClassifier(members[0], tokenizer, labels, max_len=64, precision="fp32").predict(sents)


def test_the_mean_prior_averages_the_members_weighted_scores():
    from trainformer.inference.bio import mean_prior

    a = TransitionPrior(torch.tensor([0.0, -1.0]), torch.tensor([[0.0, -2.0], [-1.0, 0.0]]), 1.0)
    b = TransitionPrior(torch.tensor([-2.0, 0.0]), torch.tensor([[-4.0, 0.0], [0.0, -2.0]]), 0.5)
    m = mean_prior([a, b], "ens")
    assert m.weight == 1.0 and torch.equal(m.start, torch.tensor([-0.5, -0.5]))
    assert torch.equal(m.trans, torch.tensor([[-1.0, -1.0], [-0.5, -0.5]]))
    assert mean_prior([a], "one") is a and mean_prior([None, None], "none") is None
    with pytest.raises(UserError, match="some members decode with a tag-transition prior"):
        mean_prior([a, None], "ens")


def test_fit_window_keeps_the_markers():
    ids = list(range(100))
    window, start = window_keeping(ids, 10, keep=[60, 65])
    assert window == ids[start : start + 10] and 60 - start >= 0 and 65 - start < 10
    assert window_keeping(ids[:8], 10, keep=[3]) == (ids[:8], 0)


def test_relation_labels_have_both_directions():
    labels = relation_labels(["Cause-Effect(e2,e1)", "Other", "Component-Whole(e1,e2)"])
    assert labels == ["Other", "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)",
                      "Component-Whole(e1,e2)", "Component-Whole(e2,e1)"]
    assert relation_type("Cause-Effect(e2,e1)") == "Cause-Effect" and relation_type("Other") == "Other"


def test_semeval_macro_f1_on_a_hand_example():
    CE12, CE21, CW12 = "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Component-Whole(e1,e2)"
    MC12 = "Member-Collection(e1,e2)"
    gold = [CE12, CE12, CE21, CW12, CW12, "Other", "Other"]
    pred = [CE12, CE21, CE21, "Other", CW12, CW12, MC12]
    s = semeval_scores(gold, pred)
    # Cause-Effect: correct 2 (type and direction), proposed 3 (the wrong direction counts
    # against precision), actual 3 -> P = R = F1 = 2/3.
    assert s["f1_Cause-Effect"] == pytest.approx(66.67)
    # Component-Whole: correct 1, proposed 2, actual 2 -> 1/2.
    assert s["f1_Component-Whole"] == pytest.approx(50.0)
    # Member-Collection is not in the gold labels: not averaged (as in the official scorer).
    assert "f1_Member-Collection" not in s
    assert s["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2, abs=0.01)
    assert s["micro_precision"] == pytest.approx(100 * 3 / 5) and s["micro_recall"] == pytest.approx(60.0)
    assert s["accuracy"] == pytest.approx(100 * 3 / 7, abs=0.01)
    perfect = semeval_scores(gold, gold)
    assert perfect["macro_f1"] == 100.0
    # direction matters: flipping every direction scores zero
    flipped = [g.replace("e1,e2", "x").replace("e2,e1", "e1,e2").replace("x", "e2,e1") for g in gold]
    assert semeval_scores(gold, flipped)["macro_f1"] == 0.0


def test_transition_prior_counts_training_bigrams():
    # O=0, B-LOC=1, I-LOC=2, B-PER=3, I-PER=4
    prior = TransitionPrior.count([[3, 4, 0], [3, 4, 0, 1]], n_labels=5)
    probs = prior.trans.exp()
    assert torch.allclose(probs.sum(1), torch.ones(5))
    assert probs[3, 4] == pytest.approx(3 / 7)  # B-PER -> I-PER seen twice, add-one over 5 labels
    assert probs[3, 3] == pytest.approx(1 / 7)
    assert prior.start.exp()[3] == pytest.approx(3 / 7)


def test_prior_keeps_a_two_word_name_whole():
    """Per-word scores that slightly prefer B-PER on the surname split one name into two
    entities; the bigram prior of data where B-PER is followed by I-PER joins them."""
    logp = torch.log(torch.tensor([[0.02, 0.01, 0.01, 0.90, 0.06],  # "Mark": B-PER
                                   [0.02, 0.01, 0.01, 0.50, 0.46]]))  # "Butcher": B-PER by a hair
    n = torch.tensor([2])
    assert viterbi_bio(logp[None], n, LABELS) == [[3, 3]]
    prior = TransitionPrior.count([[3, 4, 0]] * 20 + [[3, 0, 3]] * 2, n_labels=5)
    assert viterbi_bio(logp[None], n, LABELS, prior) == [[3, 4]]
    assert viterbi_bio(logp[None], n, LABELS, prior.with_weight(0.0)) == [[3, 3]]

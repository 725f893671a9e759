"""Greedy, beam search and sampling: the KV cache changes nothing, scores are right, a tiny model learns."""

import pytest
import torch
import torch.nn.functional as F

from trainformer.config import ModelConfig
from trainformer.generation import (
    apply_repetition_penalty,
    beam_translate,
    filter_logits,
    generate,
    greedy_translate,
    left_pad,
    length_limits,
    length_penalty_factor,
    sample_next,
)
from trainformer.generation.beam import top_candidates
from trainformer.models import build_model

V, BOS, EOS, PAD = 24, 1, 2, 0


def tiny(family, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=48, dropout=0.0, init_std=0.3,
                tie_embeddings=False)  # tied, a random model mostly repeats its input
    cfg = ModelConfig(family=family, **{**base, **kw})
    return build_model(cfg).eval()


def sources():
    src = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 6:] = False
    return src.masked_fill(~mask, PAD), mask


def teacher_forced_logprob(m, src, mask, hyp, eos=True):
    """Sum of log-probabilities of hyp (+ EOS) given one source, by full recomputation."""
    tgt = torch.tensor([[BOS] + hyp + ([EOS] if eos else [])])
    logp = torch.log_softmax(m(src[None], tgt[:, :-1], mask[None]).float(), dim=-1)
    return logp[0].gather(1, tgt[0, 1:, None]).sum().item()


# ---------------------------------------------------------------------------- greedy and beam


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "learned"])
def test_greedy_with_cache_equals_recomputation(position):
    m, (src, mask) = tiny("encoder_decoder", position=position), sources()
    cached = greedy_translate(m, src, mask, BOS, EOS, max_len=12)
    assert cached == greedy_translate(m, src, mask, BOS, EOS, max_len=12, use_cache=False)
    assert len({tuple(r) for r in cached}) > 1  # the sources really give different outputs
    # Greedy is the argmax of a full recomputation, token by token.
    row = cached[0]
    tgt = torch.tensor([[BOS] + row])
    full = m(src[:1], tgt, mask[:1]).argmax(-1)[0].tolist()
    assert full[: len(row)] == row


def test_beam_with_cache_equals_recomputation():
    m, (src, mask) = tiny("encoder_decoder", n_kv_heads=2), sources()
    for early in (True, False):
        kw = dict(beam=4, max_len=10, nbest=3, early_stopping=early, length_penalty=0.6)
        cached = beam_translate(m, src, mask, BOS, EOS, **kw)
        full = beam_translate(m, src, mask, BOS, EOS, use_cache=False, **kw)
        assert [[h for h, _ in hyps] for hyps in cached] == [[h for h, _ in hyps] for hyps in full]
        for a, b in zip(cached, full):
            assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)


def test_finished_sentences_leave_the_batch_without_changing_the_others():
    """Rows that end (EOS or their own length limit) are dropped from the batch; every
    sentence must still get exactly what it gets when decoded alone."""
    m, (src, mask) = tiny("encoder_decoder"), sources()
    with torch.no_grad():
        m.lm_head.weight[EOS] += 0.6 * m.lm_head.weight[3]  # EOS competes with token 3: ends vary
    kw = dict(max_len_a=1.0, max_len_b=2)  # limits 9, 6, 8: sources also stop at different steps
    rows, decode = [], m.decode
    m.decode = lambda tgt, *a, **k: rows.append(tgt.shape[0]) or decode(tgt, *a, **k)
    greedy = greedy_translate(m, src, mask, BOS, EOS, **kw)
    assert rows[0] == 3 and rows[-1] < 3  # the batch shrank as sentences ended
    rows.clear()
    beams = beam_translate(m, src, mask, BOS, EOS, beam=3, nbest=2, **kw)
    assert rows[1] == 9 and rows[-1] < 9
    del m.decode
    assert len({len(r) for r in greedy}) > 1 and len({len(h[0][0]) for h in beams}) > 1
    assert greedy == greedy_translate(m, src, mask, BOS, EOS, drop_finished=False, **kw)
    kept = beam_translate(m, src, mask, BOS, EOS, beam=3, nbest=2, drop_finished=False, **kw)
    assert [[h for h, _ in hyps] for hyps in beams] == [[h for h, _ in hyps] for hyps in kept]
    for i in range(src.shape[0]):
        one_src, one_mask = src[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())]
        assert greedy[i] == greedy_translate(m, one_src, one_mask, BOS, EOS, **kw)[0]
        alone = beam_translate(m, one_src, one_mask, BOS, EOS, beam=3, nbest=2, **kw)[0]
        assert [h for h, _ in beams[i]] == [h for h, _ in alone]
        assert [sc for _, sc in beams[i]] == pytest.approx([sc for _, sc in alone], abs=1e-5)


def test_beam_search_is_the_same_with_and_without_the_c_kernels():
    from trainformer.nn import native

    m, (src, mask) = tiny("encoder_decoder"), sources()
    with native.disabled():
        plain = beam_translate(m, src, mask, BOS, EOS, beam=3, max_len=10, nbest=3)
    fast = beam_translate(m, src, mask, BOS, EOS, beam=3, max_len=10, nbest=3)
    assert [[h[0] for h in s] for s in fast] == [[h[0] for h in s] for s in plain]
    for a, b in zip(fast, plain):
        torch.testing.assert_close([h[1] for h in a], [h[1] for h in b], atol=1e-5, rtol=1e-5)


def test_beam_scores_are_normalised_log_probabilities():
    m, (src, mask) = tiny("encoder_decoder"), sources()
    out = beam_translate(m, src, mask, BOS, EOS, beam=4, nbest=4, length_penalty=1.0, max_len=10)
    for i, hyps in enumerate(out):
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        for hyp, score in hyps:
            ended = len(hyp) < 10
            n = len(hyp) + 1 if ended else len(hyp)
            expected = teacher_forced_logprob(m, src[i], mask[i], hyp, eos=ended) / length_penalty_factor(n, 1.0)
            assert score == pytest.approx(expected, abs=1e-4)


def test_beam_of_one_is_greedy_and_wider_beams_score_better():
    m, (src, mask) = tiny("encoder_decoder"), sources()
    greedy = greedy_translate(m, src, mask, BOS, EOS, max_len=10)
    one = beam_translate(m, src, mask, BOS, EOS, beam=1, max_len=10, length_penalty=0.0)
    assert [h[0][0] for h in one] == greedy
    wide = beam_translate(m, src, mask, BOS, EOS, beam=6, max_len=10, length_penalty=0.0, early_stopping=False)
    for narrow, broad in zip(one, wide):
        assert broad[0][1] >= narrow[0][1] - 1e-6


def test_encoder_and_cross_kv_run_once_per_source_in_beam_search():
    m, (src, mask) = tiny("encoder_decoder"), sources()
    calls = {"encoder": [], "cross": []}
    m.layers[0].register_forward_hook(lambda mod, inp, out: calls["encoder"].append(inp[0].shape[0]))
    m.decoder_layers[0].cross_attn.kv.register_forward_hook(lambda mod, inp, out: calls["cross"].append(inp[0].shape[0]))
    beam_translate(m, src, mask, BOS, EOS, beam=4, max_len=8)
    assert calls == {"encoder": [3], "cross": [3]}  # one call, one row per source


@pytest.mark.parametrize("vocab", [8000, 4000, 96, 100, 7])
def test_top_candidates_are_the_top_k_of_all_extensions(vocab):
    """The block search finds what a top-k over every (beam, word) sum finds, including
    vocabularies that are no multiple of the block and beams far apart in score."""
    gen = torch.Generator().manual_seed(vocab)
    logp = torch.log_softmax(torch.randn(3, 4, vocab, generator=gen) * 3, dim=-1)
    scores = torch.tensor([[0.0, -0.5, -1.0, -9.0], [-2.0, -2.1, -2.2, -2.3], [0.0, -40.0, -41.0, -42.0]])
    n = min(8, 4 * vocab)
    values, index = top_candidates(logp, scores, n)
    ref_values, ref_index = (scores[:, :, None] + logp).view(3, -1).topk(n, dim=1)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)


def test_length_limits_follow_a_times_source_length_plus_b():
    src, mask = sources()
    assert length_limits(src, mask, 100, None, 1.5, 2) == [12, 8, 11]
    assert length_limits(src, mask, 100, 5) == [5, 5, 5]
    assert length_limits(src, mask, 8, None, 10.0, 0) == [7, 7, 7]  # the position table caps it
    m = tiny("encoder_decoder")
    out = greedy_translate(m, src, mask, BOS, EOS, max_len_a=1.0, max_len_b=0)
    assert all(len(o) <= n for o, n in zip(out, [7, 4, 6]))
    beams = beam_translate(m, src, mask, BOS, EOS, beam=3, max_len_a=1.0, max_len_b=0)
    assert all(len(h[0][0]) <= n for h, n in zip(beams, [7, 4, 6]))


def test_generation_restores_training_mode():
    m, (src, mask) = tiny("encoder_decoder", dropout=0.3), sources()
    m.train()
    a = greedy_translate(m, src, mask, BOS, EOS, max_len=8)
    assert m.training and a == greedy_translate(m, src, mask, BOS, EOS, max_len=8)  # no dropout inside


def test_eval_mode_leaves_a_model_already_in_eval_mode_alone(monkeypatch):
    from torch import nn

    from trainformer.generation.steppers import eval_mode

    m = tiny("encoder_decoder")
    calls = []
    monkeypatch.setattr(nn.Module, "train", lambda self, mode=True: calls.append(mode) or self)
    with eval_mode(m):
        assert not torch.is_grad_enabled()
    assert calls == []  # already in eval mode: no walk setting every module's flag, twice
    monkeypatch.undo()
    m.decoder_layers[0].train()  # one submodule in training mode: switched, then restored as `train(False)`
    with eval_mode(m):
        assert not any(sub.training for sub in m.modules())
    assert not any(sub.training for sub in m.modules())


# ---------------------------------------------------------------------------- decoder sampling


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_seeded_sampling_with_cache_equals_recomputation(position):
    m = tiny("decoder", position=position)
    kw = dict(temperature=0.9, top_k=12, top_p=0.95, repetition_penalty=1.3)
    a = generate(m, PROMPTS, 12, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(m, PROMPTS, 12, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    c = generate(m, PROMPTS, 12, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b and a != c
    assert all(len(row) == 12 for row in a)


def test_greedy_generation_of_a_padded_batch_equals_each_prompt_alone():
    m = tiny("decoder", position="rope")
    batch = generate(m, PROMPTS, 8, temperature=0)
    alone = [generate(m, [p], 8, temperature=0)[0] for p in PROMPTS]
    assert batch == alone
    # and it is the argmax of a full recomputation
    seq = PROMPTS[0] + batch[0]
    assert m(torch.tensor([seq])).argmax(-1)[0, len(PROMPTS[0]) - 1 : -1].tolist() == batch[0]


def test_generation_stops_at_eos_and_streams_tokens():
    m = tiny("decoder")
    free = generate(m, PROMPTS[:1], 6, temperature=0)[0]
    eos = free[2]
    streamed = []
    out = generate(m, PROMPTS[:1], 6, eos_id=eos, temperature=0, stream=lambda row, tok: streamed.append(tok))
    assert out[0] == free[: free.index(eos)] and streamed == out[0]


def test_finished_rows_leave_the_batch_with_the_same_results():
    m = tiny("decoder", position="rope")
    free = generate(m, PROMPTS, 8, temperature=0)
    eos = free[1][1]  # the second prompt ends after one token, the others later or never
    sizes = []
    m.layers[0].register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    dropped = generate(m, PROMPTS, 8, eos_id=eos, temperature=0)
    steps_dropped, sizes[:] = list(sizes), []
    kept = generate(m, PROMPTS, 8, eos_id=eos, temperature=0, drop_finished=False)
    assert dropped == kept == [row[: row.index(eos)] if eos in row else row for row in free]
    assert sizes == [3] * len(sizes) and steps_dropped[0] == 3 and steps_dropped[-1] < 3  # rows left
    kw = dict(eos_id=eos, temperature=1.2, top_k=20, repetition_penalty=1.2)
    cached = generate(m, PROMPTS, 10, generator=torch.Generator().manual_seed(5), **kw)
    recomputed = generate(m, PROMPTS, 10, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert cached == recomputed  # dropping rows keeps the cache equal to recomputation


def test_top_k_one_is_greedy():
    m = tiny("decoder")
    greedy = generate(m, PROMPTS, 6, temperature=0)
    assert generate(m, PROMPTS, 6, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy


def test_filters_and_penalty_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    seen = torch.tensor([[True, False, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(4000, 4)
    draws = sample_next(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.03, rtol=0)


def test_left_pad():
    x, mask = left_pad([[4, 5, 6], [7]])
    assert x.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[True] * 3, [False, False, True]]


# ---------------------------------------------------------------------------- a tiny model learns


def _reverse_batch(n, g, vocab=13):
    lengths = torch.randint(3, 9, (n,), generator=g)
    width = int(lengths.max())
    mask = torch.arange(width)[None] < lengths[:, None]
    src = torch.randint(3, vocab, (n, width), generator=g).masked_fill(~mask, PAD)
    tgt = torch.full((n, width + 2), PAD)
    for i, n_i in enumerate(lengths.tolist()):
        tgt[i, 0], tgt[i, n_i + 1] = BOS, EOS
        tgt[i, 1 : n_i + 1] = src[i, :n_i].flip(0)
    return src, mask, tgt


@pytest.mark.slow
def test_tiny_encoder_decoder_learns_to_reverse():
    torch.manual_seed(0)
    vocab = 13
    cfg = ModelConfig(family="encoder_decoder", vocab_size=vocab, d_model=64, n_heads=4, n_layers=2, d_ff=128,
                      dropout=0.0, max_len=32)
    m = build_model(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0, fused=True)
    g, recent = torch.Generator().manual_seed(0), []
    for _ in range(700):
        src, mask, tgt = _reverse_batch(64, g, vocab)
        logits = m(src, tgt[:, :-1], mask)
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if len(recent) == 20 and sum(recent) / 20 < 0.01:
            break
    src, mask, _ = _reverse_batch(300, torch.Generator().manual_seed(99), vocab)
    want = [src[i, : int(mask[i].sum())].flip(0).tolist() for i in range(300)]
    greedy = greedy_translate(m, src, mask, BOS, EOS)
    assert sum(a == b for a, b in zip(greedy, want)) / 300 >= 0.99
    beams = beam_translate(m, src[:50], mask[:50], BOS, EOS, beam=3)
    assert sum(h[0][0] == w for h, w in zip(beams, want)) / 50 >= 0.98


def test_repetition_penalty_sees_prompt_and_output_but_not_padding(monkeypatch):
    from trainformer.generation import sampling

    seen_sets, real = [], sampling.apply_repetition_penalty

    def spy(logits, seen, penalty):
        seen_sets.append([set(torch.nonzero(row).flatten().tolist()) for row in seen])
        return real(logits, seen, penalty)

    monkeypatch.setattr(sampling, "apply_repetition_penalty", spy)
    m = tiny("decoder")
    out = generate(m, PROMPTS, 4, temperature=0, repetition_penalty=1.5)
    for step, sets in enumerate(seen_sets):
        for prompt, row, seen in zip(PROMPTS, out, sets):
            assert seen == set(prompt) | set(row[:step])  # pad id 0 is not "seen"
    penalised = generate(m, PROMPTS, 8, temperature=0, repetition_penalty=3.0)
    repeats = sum(len(r) - len(set(r)) for r in penalised)
    assert repeats < sum(len(r) - len(set(r)) for r in generate(m, PROMPTS, 8, temperature=0))

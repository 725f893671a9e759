"""The shared blocks: attention against the plain reference, masks, positions, norms, FFN, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainformer.nn import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    KVCache,
    LearnedPositions,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositions,
    TokenEmbedding,
    init_weights,
    key_padding_mask,
    make_norm,
    positions_for,
    reference_attention,
    scale_residual_projections,
    self_attention_mask,
)
from trainformer.nn.cache import LayerKV

B, T, D, H = 2, 7, 32, 4


def _mha(n_kv=None, cross=False, seed=0):
    torch.manual_seed(seed)
    m = MultiHeadAttention(D, H, n_kv, cross=cross)
    init_weights(m, 0.2)  # large weights: attention patterns far from uniform
    return m.eval()


def _split_heads(x, n):  # (B, T, n*Dh) -> (B, n, T, Dh)
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _reference(m, x, memory=None, mask=None, causal=False, rope_pos=None):
    """The module's projections done by hand, then `reference_attention`."""
    dh, kv = D // H, m.n_kv_heads
    if m.cross:
        q = x @ m.q.weight.T + m.q.bias
        wk, wv = m.kv.weight.split(kv * dh)
        bk, bv = m.kv.bias.split(kv * dh)
        k, v = memory @ wk.T + bk, memory @ wv.T + bv
    else:
        wq, wk, wv = m.qkv.weight.split([H * dh, kv * dh, kv * dh])
        bq, bk, bv = m.qkv.bias.split([H * dh, kv * dh, kv * dh])
        q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    q, k, v = _split_heads(q, H), _split_heads(k, kv), _split_heads(v, kv)
    if rope_pos is not None:
        q, k = _rope_by_pairs(q, rope_pos), _rope_by_pairs(k, rope_pos)
    y = reference_attention(q, k, v, mask, causal)  # (B, H, T, Dh)
    return y.transpose(1, 2).reshape(x.shape[0], x.shape[1], D) @ m.out.weight.T + m.out.bias


def _rope_by_pairs(x, positions, theta=10000.0):
    """RoPE written out: rotate the pair (i, i + Dh/2) by pos * theta^(-2i/Dh)."""
    out = x.clone()
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            a = pos * theta ** (-2 * i / x.shape[-1])
            x1, x2 = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, i + half] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def _padding(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, width)


# ---------------------------------------------------------------------------- attention vs reference


def test_self_attention_matches_reference():
    m, x = _mha(), torch.randn(B, T, D)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-5, rtol=1e-4)


def test_causal_attention_matches_reference():
    m, x = _mha(), torch.randn(B, T, D)
    mask, is_causal = self_attention_mask(T, 0, x.device)
    assert mask is None and is_causal  # the fast SDPA path is taken
    torch.testing.assert_close(m(x, is_causal=True), _reference(m, x, causal=True), atol=1e-5, rtol=1e-4)


def test_padded_self_attention_matches_reference_on_real_tokens():
    m, x = _mha(), torch.randn(B, T, D)
    real = _padding([T, 4], T)
    out = m(x, attn_mask=key_padding_mask(real))
    ref = _reference(m, x, mask=real[:, None, None, :])
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)


def test_padded_causal_attention_matches_reference():
    m, x = _mha(), torch.randn(B, T, D)
    real = _padding([T, 5], T)
    mask, is_causal = self_attention_mask(T, 0, x.device, key_mask=real)
    out = m(x, attn_mask=mask, is_causal=is_causal)
    ref = _reference(m, x, mask=real[:, None, None, :], causal=True)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)


def test_cross_attention_matches_reference_with_padded_memory():
    m, x, memory = _mha(cross=True), torch.randn(B, T, D), torch.randn(B, 5, D)
    real = _padding([5, 2], 5)
    out = m(x, memory, attn_mask=key_padding_mask(real))
    torch.testing.assert_close(out, _reference(m, x, memory, mask=real[:, None, None, :]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv", [1, 2])
def test_grouped_query_attention_matches_reference(n_kv):
    m, x = _mha(n_kv=n_kv), torch.randn(B, T, D)
    assert m.qkv.weight.shape[0] == (H + 2 * n_kv) * (D // H)
    torch.testing.assert_close(m(x, is_causal=True), _reference(m, x, causal=True), atol=1e-5, rtol=1e-4)


def test_rope_attention_matches_reference():
    m, x = _mha(), torch.randn(B, T, D)
    rope = RotaryEmbedding(D // H, max_len=32)
    pos = torch.arange(3, 3 + T)  # an offset, as after a cache
    out = m(x, is_causal=True, rope=rope(pos))
    torch.testing.assert_close(out, _reference(m, x, causal=True, rope_pos=pos), atol=1e-5, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    rope, q, k = RotaryEmbedding(8, 64), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    from trainformer.nn import apply_rotary

    def score(i, j):
        return (apply_rotary(q, *rope(torch.tensor([i]))) * apply_rotary(k, *rope(torch.tensor([j])))).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_sdpa_never_gets_attention_dropout(monkeypatch):
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    layer = DecoderLayer(D, H, 64, cross=True, dropout=0.3).train()
    layer(torch.randn(B, T, D), is_causal=True, memory=torch.randn(B, 5, D))
    assert seen == [0.0, 0.0]


# ---------------------------------------------------------------------------- cache and masks


@pytest.mark.parametrize("rope", [False, True])
def test_cached_attention_with_causal_offset_equals_full(rope):
    m, x = _mha(), torch.randn(B, 9, D)
    real = _padding([9, 6], 9)  # the second row is right-padded (left part real)
    real = real.flip(1)  # left padding: the harder case for positions and masks
    rot = RotaryEmbedding(D // H, 32) if rope else None

    def run(t0, t1, past, kv):
        mask, causal = self_attention_mask(t1 - t0, past, x.device, key_mask=real[:, :t1])
        pos = positions_for(t1 - t0, past, x.device, real[:, :t1])
        return m(x[:, t0:t1], attn_mask=mask, is_causal=causal, rope=rot(pos) if rot else None, cache=kv)

    full = run(0, 9, 0, None)
    kv = LayerKV()
    parts = [run(0, 4, 0, kv), run(4, 7, 4, kv), run(7, 8, 7, kv), run(8, 9, 8, kv)]  # P=4,T=3 then T=1
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], full[real], atol=1e-5, rtol=1e-4)


def test_cross_attention_cache_computes_memory_kv_once():
    m, memory = _mha(cross=True), torch.randn(B, 5, D)
    calls = []
    m.kv.register_forward_hook(lambda *a: calls.append(1))
    kv = LayerKV()
    first = m(torch.randn(B, 1, D), memory, cache=kv)
    x = torch.randn(B, 1, D)
    torch.testing.assert_close(m(x, None, cache=kv), m(x, memory))
    assert first.shape == (B, 1, D) and len(calls) == 2  # once for the cache, once uncached


def test_cross_attention_shared_by_a_group_of_rows_equals_copied_kv():
    """Beam search keeps one row of cross K/V per source for all its beams (`LayerKV.group`)."""
    m, memory = _mha(cross=True), torch.randn(B, 5, D)
    real = torch.tensor([[True] * 5, [True, True, True, False, False]])
    shared = LayerKV()
    m(memory[:, :1], memory, cache=shared)  # fills one row of K/V per source
    copied = LayerKV()
    copied.k, copied.v = shared.k.repeat_interleave(3, 0), shared.v.repeat_interleave(3, 0)
    shared.group = 3
    x = torch.randn(3 * B, 2, D)  # 3 rows per source, 2 new tokens each
    mask = key_padding_mask(real)
    torch.testing.assert_close(m(x, None, attn_mask=mask, cache=shared),
                               m(x, None, attn_mask=mask.repeat_interleave(3, 0), cache=copied))


def test_kv_cache_select_moves_shared_cross_kv_with_their_groups():
    cache = KVCache(1)
    src = torch.arange(3.0).view(3, 1, 1, 1)  # three sources
    cache.cross_kv[0].append(src, src)
    cache.cross_mask = torch.tensor([[True], [False], [True]])
    cache.share_cross(2)
    rows = torch.arange(6.0).view(6, 1, 1, 1)  # two rows (beams) per source
    cache.self_kv[0].append(rows, rows)
    cache.select(torch.tensor([2, 3, 4, 5]))  # source 0 leaves
    assert cache.self_kv[0].k.flatten().tolist() == [2, 3, 4, 5]
    assert cache.cross_kv[0].k.flatten().tolist() == [1, 2]
    assert cache.cross_mask.flatten().tolist() == [False, True]
    cache.select(torch.tensor([1, 1, 2, 3]), cross=False)  # beams reorder within their source
    assert cache.cross_kv[0].k.flatten().tolist() == [1, 2] and cache.cross_group == 2


def test_fully_masked_rows_are_finite():
    m, x = _mha(), torch.randn(B, T, D)
    real = torch.zeros(B, T, dtype=torch.bool)
    real[0, 3:] = True  # row 0 left-padded: its first queries see no real key
    for mask in (key_padding_mask(real), self_attention_mask(T, 0, x.device, key_mask=real)[0]):
        assert torch.isfinite(m(x, attn_mask=mask)).all()


def test_causal_mask_with_cache_is_offset():
    mask, is_causal = self_attention_mask(2, 3, torch.device("cpu"), key_mask=torch.ones(1, 5, dtype=torch.bool))
    assert not is_causal
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert self_attention_mask(1, 3, torch.device("cpu")) == (None, False)  # one token sees all


def test_doc_mask_is_block_diagonal_causal():
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    mask, _ = self_attention_mask(5, 0, torch.device("cpu"), doc_ids=docs)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert mask[0, 0].long().tolist() == expected.tolist()
    assert positions_for(5, 0, docs.device, doc_ids=docs).tolist() == [[0, 1, 0, 1, 2]]


def test_positions_count_real_tokens_only():
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert positions_for(4, 0, real.device, real).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert positions_for(2, 2, real.device, real).tolist() == [[0, 1], [2, 3]]  # last 2 of the 4
    assert positions_for(3, 5, real.device).tolist() == [5, 6, 7]


def test_kv_cache_select_reorders_rows():
    cache = KVCache(1)
    k = torch.arange(3.0).view(3, 1, 1, 1)
    cache.self_kv[0].append(k, k)
    cache.cross_kv[0].append(k, k)
    cache.select(torch.tensor([2, 2, 0]), cross=False)
    assert cache.self_kv[0].k.flatten().tolist() == [2, 2, 0]
    assert cache.cross_kv[0].k.flatten().tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- embeddings


def test_sinusoidal_positions_follow_the_formula_and_are_a_buffer():
    pe = SinusoidalPositions(50, 16)
    pos, i = 7, 3
    assert pe.pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe.pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert list(pe.parameters()) == [] and "pe" not in pe.state_dict()
    torch.testing.assert_close(pe(torch.tensor([[7]]))[0, 0], pe.pe[7])


def test_token_embedding_scale_and_learned_positions():
    emb = TokenEmbedding(10, 16, scale=True)
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight) * 4.0)
    plain = TokenEmbedding(10, 16, scale=False)
    torch.testing.assert_close(plain(ids), plain.weight[ids])
    assert sum(p.numel() for p in LearnedPositions(12, 16).parameters()) == 12 * 16


# ---------------------------------------------------------------------------- feed-forward, norms, layers


def test_tied_head_decoding_path_equals_the_linear_and_follows_weight_updates():
    from trainformer.nn.cpu_head import onednn_prepacked_linear

    emb = TokenEmbedding(50, 16)
    h = torch.randn(3, 1, 16)
    with torch.no_grad():
        fast = emb.attend(h)  # decoding rows on the CPU: a cached copy of the weight
        assert emb.fast_head.applies(h, emb.weight)
        layout = "onednn" if onednn_prepacked_linear() else "transposed"
        assert list(emb.fast_head._copies) == [(layout, torch.float32)]
        torch.testing.assert_close(fast, F.linear(h, emb.weight))
        torch.testing.assert_close(emb.attend(h[:1]), F.linear(h[:1], emb.weight))  # one row: the transpose
        assert ("transposed", torch.float32) in emb.fast_head._copies
        emb.weight.mul_(2.0)  # an optimizer step or a load: the copy is rebuilt
        torch.testing.assert_close(emb.attend(h), F.linear(h, emb.weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 decoding: bf16 logits, as autocast's linear
            fast, plain = emb.attend(h), F.linear(h, emb.weight)
        assert fast.dtype == plain.dtype == torch.bfloat16
        torch.testing.assert_close(fast, plain, rtol=1e-2, atol=1e-2)
        many = torch.randn(2, 300, 16)  # teacher-forced evaluation: oneDNN where it is there, else F.linear
        torch.testing.assert_close(emb.attend(many), F.linear(many, emb.weight))
    assert list(emb.state_dict()) == ["weight"]  # the copy is never saved
    with torch.inference_mode():  # weights made in inference mode have no version counter
        made_there = TokenEmbedding(50, 16)
        torch.testing.assert_close(made_there.attend(h), F.linear(h, made_there.weight))
    logits = emb.attend(h)  # with gradients: the plain linear, and the weight gets them
    logits.sum().backward()
    assert emb.weight.grad is not None and logits.requires_grad


def test_feedforward_activations():
    x = torch.randn(2, 3, D)
    for act, fn in (("gelu", F.gelu), ("relu", F.relu)):
        ff = FeedForward(D, 64, act)
        torch.testing.assert_close(ff(x), ff.down(fn(ff.up(x))))
    ff = FeedForward(D, 64, "swiglu")
    assert ff.up.weight.shape == (128, D)  # gate and value in one GEMM
    gate, value = ff.up(x).chunk(2, dim=-1)
    torch.testing.assert_close(ff(x), ff.down(F.silu(gate) * value))


def test_norms_are_torch_modules_and_honour_bias():
    assert isinstance(make_norm("rmsnorm", D), torch.nn.RMSNorm)
    assert make_norm("layernorm", D, bias=False).bias is None
    with pytest.raises(ValueError):
        make_norm("batchnorm", D)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_wiring(norm_first):
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, 64, norm_first=norm_first).eval()
    x = torch.randn(B, T, D)
    attn, ffn = layer.self_attn, layer.ffn
    if norm_first:  # x + f(norm(x))
        h = x + attn(layer.attn_norm(x))
        expected = h + ffn(layer.ffn_norm(h))
    else:  # norm(x + f(x)), the 2017 layout
        h = layer.attn_norm(x + attn(x))
        expected = layer.ffn_norm(h + ffn(h))
    torch.testing.assert_close(layer(x), expected)


def test_init_statistics():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(EncoderLayer(256, 4, 1024) for _ in range(2))
    init_weights(layers, 0.02)
    scale_residual_projections(layers, 0.02, n_layers=2)
    layer = layers[0]
    assert layer.self_attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.out.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert layer.ffn.down.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert layer.ffn.up.bias.abs().sum() == 0 and (layer.attn_norm.weight == 1).all()


def test_cpu_bf16_attention_modes_under_autocast():
    """bf16 q/k/v on the CPU: "auto" = the bf16 matmul path up to MATMUL_MAX_KEYS keys, "fp32" =
    SDPA's fp32 kernel (autocast paused), the result cast back; "sdpa" = SDPA's own bf16 kernel.
    All close to fp32 attention, with gradients."""
    from trainformer.nn import attention
    from trainformer.nn.attention import matmul_attention, sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = {mode: sdpa(q, k, v, attn_mask=mask, cpu_bf16=mode) for mode in attention.CPU_BF16}
    assert all(t.dtype == torch.bfloat16 for t in y.values())
    assert torch.equal(y["auto"], matmul_attention(q, k, v, mask))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    assert torch.equal(y["fp32"], exact)
    ref = reference_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(y["fp32"].float(), ref, atol=1e-2, rtol=1e-2)
    for mode in ("auto", "sdpa"):
        torch.testing.assert_close(y[mode].float(), ref, atol=3e-2, rtol=3e-2)
    y["auto"].float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("grad", [True, False])
def test_cpu_bf16_attention_above_the_key_limit_runs_in_fp32(grad, monkeypatch):
    """Above MATMUL_MAX_KEYS keys bf16 attention is the fp32 kernel's, with or without gradients."""
    from trainformer.nn import attention

    q, k, v = (torch.randn(2, 2, 7, 8).bfloat16().requires_grad_(grad) for _ in range(3))
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(attention, "MATMUL_MAX_KEYS", 7)
        assert attention.matmul_pays(q, k)
        assert not torch.equal(attention.sdpa(q, k, v, is_causal=True), fp32)
        monkeypatch.setattr(attention, "MATMUL_MAX_KEYS", 6)
        assert not attention.matmul_pays(q, k)
        assert torch.equal(attention.sdpa(q, k, v, is_causal=True), fp32)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("masking", ["causal", "causal+padding", "per-query"])
def test_matmul_attention_with_causal_and_query_masks_equals_reference(n_kv, masking):
    """Training shapes (T queries per row): causal, causal with key padding, and a per-query
    (B, 1, T, S) mask, GQA included; values and gradients equal plain attention."""
    from trainformer.nn.attention import matmul_attention
    from trainformer.nn.masks import causal_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 6, 8, generator=g).requires_grad_()
    k, v = (torch.randn(3, n_kv, 6, 8, generator=g).requires_grad_() for _ in range(2))
    pad = _padding([6, 4, 2], 6)
    if masking == "causal":
        y = matmul_attention(q, k, v, is_causal=True)
        ref = reference_attention(q, k, v, causal=True)
    elif masking == "causal+padding":
        y = matmul_attention(q, k, v, key_padding_mask(pad), is_causal=True)
        ref = reference_attention(q, k, v, key_padding_mask(pad), causal=True)
    else:
        mask = causal_mask(6, 0, q.device, key_mask=pad)  # (B, 1, T, S)
        y, ref = matmul_attention(q, k, v, mask), reference_attention(q, k, v, mask)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad((y * w).sum(), (q, k, v)),
                         torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("needs", ["q", "k", "v", "kv"])
def test_matmul_attention_gradients_of_some_inputs(needs):
    """The backward computes only the gradients asked for, each equal to plain attention's."""
    from trainformer.nn.attention import matmul_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    mask = key_padding_mask(_padding([5, 3], 5))
    wanted = [t.requires_grad_() for name, t in zip("qkv", (q, k, v)) if name in needs]
    y, ref = matmul_attention(q, k, v, mask, is_causal=True), reference_attention(q, k, v, mask, causal=True)
    w = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad((y * w).sum(), wanted), torch.autograd.grad((ref * w).sum(), wanted)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(6, 6), (1, 6, 6), (1, 1, 6, 6), (1, 1, 1, 6)])
def test_matmul_attention_with_a_mask_shared_by_the_batch(shape):
    """A mask without a batch dimension (or of batch 1) is one bias for every row, added by the
    GEMM with the causal one."""
    from trainformer.nn import attention
    from trainformer.nn.attention import matmul_attention

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=g) for _ in range(3))
    mask = torch.rand(shape, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least key 0
    assert attention._heads_shared(mask)
    y = matmul_attention(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(y, reference_attention(q, k, v, mask, causal=True), atol=1e-6, rtol=1e-5)
    assert not attention._heads_shared(torch.ones(4, 6, 6, dtype=torch.bool))  # (H, T, S): a mask per head


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_matmul_attention_equals_reference(n_kv, queries, padded):
    """The decoding step's batched-GEMM attention (a few queries per row, optional key
    padding mask) = plain attention, GQA included."""
    from trainformer.nn.attention import matmul_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, queries, 8, generator=g)
    k, v = torch.randn(5, n_kv, 11, 8, generator=g), torch.randn(5, n_kv, 11, 8, generator=g)
    mask = key_padding_mask(_padding([11, 3, 7, 11, 1], 11)) if padded else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    y, ref = matmul_attention(q, k, v, mask), reference_attention(q, k, v, mask)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(y)  # differentiable as well (the step dispatches to it only without autograd)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _count_matmul_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes (q, k) of every `matmul_attention` call from now on, with the C kernel off
    (the path decoding takes where it cannot be built; tests/test_native.py covers it)."""
    import trainformer.nn.attention as attention

    monkeypatch.setattr(attention.native, "available", lambda: False)
    calls = []
    real = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention",
                        lambda q, k, *a: calls.append((tuple(q.shape), tuple(k.shape))) or real(q, k, *a))
    return calls


def test_cached_decoding_of_many_rows_takes_the_few_query_path_and_equals_full(monkeypatch):
    """Rows x heads and cached keys above the thresholds: the cached T=1 step goes through
    `matmul_attention` (and not SDPA) and still equals the full causal pass."""
    import trainformer.nn.attention as attention

    calls = _count_matmul_calls(monkeypatch)
    m = _mha()
    b = attention.ONE_QUERY_MIN_BLOCKS // H
    steps = attention.FEW_QUERY_MIN_SCORES + 2
    x = torch.randn(b, steps, D)
    full = m(x, is_causal=True)
    kv = LayerKV()
    with torch.no_grad():  # decoding: training steps keep SDPA
        parts = [m(x[:, t:t + 1], cache=kv) for t in range(steps)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert [k[2] for _, k in calls] == list(range(attention.FEW_QUERY_MIN_SCORES, steps + 1))


def test_shared_cross_attention_of_many_sources_takes_the_few_query_path_with_padding(monkeypatch):
    """A source's beams over its padded memory (shared cross K/V, one block of `beam` queries):
    above the thresholds the step takes `matmul_attention` with the key mask and equals
    each beam attending alone through SDPA."""
    import trainformer.nn.attention as attention

    calls = _count_matmul_calls(monkeypatch)
    m, beam = _mha(cross=True), 4
    sources, s = attention.FEW_QUERY_MIN_BLOCKS // H, 7  # 4 queries x 7 keys: above the scores threshold
    memory = torch.randn(sources, s, D)
    lengths = [s - i % 5 for i in range(sources)]
    mask = key_padding_mask(_padding(lengths, s))  # (B, 1, 1, S)
    x = torch.randn(sources * beam, 1, D)
    with monkeypatch.context() as off:
        off.setattr(attention, "ONE_QUERY_MIN_BLOCKS", 10**9)  # SDPA only
        alone = m(x, memory.repeat_interleave(beam, 0), attn_mask=mask.repeat_interleave(beam, 0))
    assert not calls
    kv = LayerKV()
    m(x[::beam], memory, attn_mask=mask, cache=kv)  # the first step fills the cache, one row per source
    kv.group = beam
    assert not calls  # gradients recorded (training): SDPA
    with torch.no_grad():
        shared = m(x, attn_mask=mask, cache=kv)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-4)
    assert calls == [((sources, H, beam, D // H), (sources, H, s, D // H))]


def test_cache_cross_attention_mask_is_none_without_padding_and_follows_select():
    cache = KVCache(1)
    cache.cross_mask = torch.ones(3, 5, dtype=torch.bool)
    assert cache.cross_attention_mask() is None  # nothing padded: SDPA gets no mask at all
    cache.cross_kv[0].k = cache.cross_kv[0].v = torch.zeros(3, 1, 5, 2)
    real = _padding([5, 2, 4], 5)
    cache.cross_mask = real
    assert torch.equal(cache.cross_attention_mask(), key_padding_mask(real))
    assert cache.cross_attention_mask() is cache.cross_attention_mask()  # worked out once
    cache.select(torch.tensor([1, 1, 2]))
    assert torch.equal(cache.cross_attention_mask(), key_padding_mask(real[[1, 1, 2]]))
    cache.select(torch.tensor([0, 0, 2]))  # rows 0, 1 were both source 1: the two padded rows remain
    cache.select(torch.tensor([2]))  # one source is left, 4 of its 5 tokens real
    assert cache.cross_attention_mask() is not None  # [4 real of 5]: still padded
    cache.cross_mask = torch.ones(1, 5, dtype=torch.bool)
    assert cache.cross_attention_mask() is None

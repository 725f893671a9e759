"""The C kernel of CPU decoding attention: equals plain attention, is what a decoding step takes,
and decoding falls back to PyTorch's kernels (with a one-line notice) where it cannot be built."""

import pytest
import torch

import trainformer.nn.attention as attention
from trainformer.nn import native
from trainformer.nn.attention import MultiHeadAttention, reference_attention
from trainformer.nn.cache import LayerKV
from trainformer.nn.masks import key_padding_mask

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler to build the kernel")


def _expected(q, k, v, mask, group):
    """reference_attention with k/v (and mask) repeated for each of their `group` query rows, as (N, T, H*Dh)."""
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    mask = mask.repeat_interleave(group, 0) if mask is not None else None
    y = reference_attention(q, k, v, mask)  # (N, H, T, Dh)
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dh", [(4, 4, 48), (4, 2, 32), (2, 1, 64), (3, 3, 20)])
@pytest.mark.parametrize("t,group", [(1, 1), (1, 4), (3, 2)])
def test_kernel_equals_plain_attention(heads, kv_heads, dh, t, group):
    n, s = 8, 9
    q = torch.randn(n, t, heads, dh).transpose(1, 2)  # (N, H, T, Dh) as the layer makes it: strided
    k, v = torch.randn(n // group, kv_heads, s, dh), torch.randn(n // group, kv_heads, s, dh)
    lengths = torch.tensor([s - i % 4 for i in range(n // group)])
    mask = key_padding_mask(torch.arange(s)[None] < lengths[:, None])  # (N / g, 1, 1, S)
    for m in (None, mask):
        y = native.decode_attention(q, k, v, m, group)
        assert y.shape == (n, t, heads * dh) and y.is_contiguous()
        torch.testing.assert_close(y, _expected(q, k, v, m, group), atol=1e-6, rtol=1e-5)


@needs_kernel
def test_kernel_takes_strided_keys_and_more_keys_than_its_stack_buffer():
    q = torch.randn(2, 2, 1, 16)
    kv = torch.randn(2, 5000, 2 * 2 * 16)[..., :2 * 16 * 2].view(2, 5000, 2, 2, 16)  # (B, S, 2, KV, Dh)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, KV, S, Dh) views: cross-attention's
    torch.testing.assert_close(native.decode_attention(q, k, v, None), _expected(q, k, v, None, 1),
                               atol=1e-6, rtol=1e-5)


def _mha(cross=False):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, cross=cross).eval()


def _count_kernel_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention",
                        lambda q, k, v, *a: calls.append(tuple(k.shape)) or real(q, k, v, *a))
    return calls


@needs_kernel
def test_cached_decoding_takes_the_kernel_and_equals_the_full_causal_pass(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    m, x = _mha(), torch.randn(3, 6, 32)
    full = m(x, is_causal=True)
    kv = LayerKV()
    with torch.no_grad():
        parts = [m(x[:, t:t + 1], cache=kv) for t in range(6)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert [c[2] for c in calls] == [1, 2, 3, 4, 5, 6]  # every step (keys = cached tokens)
    calls.clear()
    m(x, is_causal=True).sum().backward()  # training: SDPA and its backward, never the kernel
    assert calls == []


@needs_kernel
def test_beams_sharing_a_padded_memory_take_the_kernel_and_equal_each_beam_alone(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    m, beam, s = _mha(cross=True), 4, 7
    memory = torch.randn(3, s, 32)
    mask = key_padding_mask(torch.arange(s)[None] < torch.tensor([[7], [5], [3]]))
    x = torch.randn(3 * beam, 1, 32)
    cache = LayerKV()
    with torch.no_grad():
        m(x[::beam], memory, attn_mask=mask, cache=cache)  # the first step fills the cross K/V
        cache.group = beam  # then each source's row serves its beams
        shared = m(x, attn_mask=mask, cache=cache)
        alone = m(x, memory.repeat_interleave(beam, 0), attn_mask=mask.repeat_interleave(beam, 0))
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-4)
    assert calls == [(3, 4, s, 8), (3, 4, s, 8), (12, 4, s, 8)]  # shared: one row of K/V per source


@needs_kernel
def test_bf16_decoding_runs_the_kernel_in_fp32_and_returns_bf16(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    m, x = _mha(), torch.randn(2, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, cache=LayerKV())
        want = m(x)  # the same step without a cache: SDPA
    assert calls and y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)


@pytest.fixture
def fresh_library(monkeypatch):
    """`native._library` asked again (it is cached per process), and cached again after."""
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def test_without_a_compiler_decoding_falls_back_with_one_notice(fresh_library, monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not native.available()
    assert "no C compiler found" in capsys.readouterr().err
    m, x = _mha(), torch.randn(2, 3, 32)
    kv = LayerKV()
    with torch.no_grad():  # PyTorch's kernels, same results
        parts = [m(x[:, t:t + 1], cache=kv) for t in range(3)]
    torch.testing.assert_close(torch.cat(parts, dim=1), m(x, is_causal=True), atol=1e-5, rtol=1e-4)


def test_a_failing_build_is_one_line_and_the_switch_turns_it_off(fresh_library, monkeypatch, capsys):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    assert not native.available()
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainformer: warning: could not build the native CPU kernels with false")
    assert len(err.splitlines()) == 1
    native._library.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("TRAINFORMER_NATIVE", "0")
    assert not native.available() and capsys.readouterr().err == ""
    with pytest.raises(RuntimeError, match="not available"):
        native.decode_attention(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), None)
    assert attention.native is native


@needs_kernel
@pytest.mark.parametrize("v,block", [(8000, 32), (96, 32), (40, 8)])
def test_logsumexp_and_block_maxima_equal_torch(v, block):
    logits = (torch.randn(5, v + 3) * 4)[:, :v]  # rows with a stride
    lse, block_max = native.logsumexp_block_max(logits, block)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(block_max, logits.reshape(5, v // block, block).amax(dim=-1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of"):
        native.logsumexp_block_max(logits[:, :v - 1], block)


@needs_kernel
def test_beam_candidates_from_the_kernel_equal_those_of_log_softmax():
    from trainformer.generation.beam import next_candidates, top_candidates

    torch.manual_seed(0)
    logits, scores = torch.randn(6, 4, 800) * 3, -torch.rand(6, 4) * 5
    values, idx = next_candidates(logits, scores, 8)
    want_values, want_idx = top_candidates(torch.log_softmax(logits, dim=-1), scores, 8)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(values, want_values, atol=1e-5, rtol=1e-6)
    with native.disabled():  # the same call on PyTorch's kernels
        assert torch.equal(next_candidates(logits, scores, 8)[1], want_idx)


@needs_kernel
def test_gelu_kernel_equals_torch_and_the_feed_forward_takes_it_outside_autograd(monkeypatch):
    import torch.nn.functional as F

    from trainformer.nn.feedforward import FeedForward

    x = torch.randn(3, 50) * 5
    torch.testing.assert_close(native.gelu_(x.clone()), F.gelu(x), atol=2e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        native.gelu_(x.t())
    calls = []
    real = native.gelu_
    monkeypatch.setattr(native, "gelu_", lambda h: calls.append(h.shape) or real(h))
    ff = FeedForward(16, 32, "gelu")
    h = torch.randn(2, 5, 16)
    trained = ff(h)  # autograd: F.gelu
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(ff(h), trained, atol=1e-6, rtol=1e-5)
    assert calls == [(2, 5, 32)]


@needs_kernel
def test_kernel_takes_a_bf16_cache_and_computes_in_float32():
    q = torch.randn(4, 1, 3, 48).transpose(1, 2)  # (N, H, T, Dh), strided
    k, v = torch.randn(4, 3, 6, 48).bfloat16(), torch.randn(4, 3, 6, 48).bfloat16()
    mask = key_padding_mask(torch.arange(6)[None] < torch.tensor([[6], [4], [5], [2]]))
    y = native.decode_attention(q.bfloat16(), k, v, mask)
    want = _expected(q.bfloat16().float(), k.float(), v.float(), mask, 1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_rejects_shapes_it_cannot_take_instead_of_crashing():
    q = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="heads"):
        native.decode_attention(q, torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), None)
    with pytest.raises(ValueError, match="group"):
        native.decode_attention(torch.randn(3, 2, 1, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), None, 2)
    with pytest.raises(ValueError, match="head size"):
        native.decode_attention(q, torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), None)


@needs_kernel
def test_with_several_threads_only_small_steps_take_the_kernels(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert native.pays(10 ** 7)  # one thread: always
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert native.pays(native.SMALL_WORK) and not native.pays(native.SMALL_WORK + 1)
    calls = _count_kernel_calls(monkeypatch)
    m = _mha()
    with torch.no_grad():
        m(torch.randn(2, 1, 32), cache=LayerKV())  # a small step: the kernel
        assert len(calls) == 1
        kv = LayerKV()
        kv.append(torch.randn(512, 4, 200, 8), torch.randn(512, 4, 200, 8))
        m(torch.randn(512, 1, 32), cache=kv)  # a big one: PyTorch's multi-threaded kernels
    assert len(calls) == 1

"""One multi-head attention module for self, causal and cross attention.

It runs on `torch.nn.functional.scaled_dot_product_attention` in the
(B, H, T, Dh) layout SDPA wants, with a fused QKV projection for
self-attention (one GEMM instead of three), grouped-query heads
(`n_kv_heads` < `n_heads`, SDPA's ``enable_gqa``), rotary positions and an
incremental KV cache. Attention-probability dropout is deliberately absent:
``dropout_p > 0`` pushes CPU SDPA onto a ~9x slower kernel, so dropout is
applied to the residual branch instead (see `EncoderLayer`).

On the CPU, bf16 attention over up to `MATMUL_MAX_KEYS` keys is two bf16
batched GEMMs around a softmax with the scores materialised (`matmul_attention`),
and longer ones are computed in fp32 (`sdpa`, `matmul_pays`): PyTorch's CPU flash-attention
kernel pays a fixed cost per (row, head) block and is slower in bf16 than in
fp32 at every length we train at (`benchmarks/speed/bench_attention.py`).
A decoding step's attention (one new query per row against the cache, or a
source's beams against its memory) runs in a small C kernel where it is built
(`trainformer.nn.native`), else as the same two batched GEMMs where that kernel's
per-head overhead dominates (`few_query_pays`).

`reference_attention` is the plain softmax(QK^T / sqrt(Dh)) V the tests
compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainformer.nn import native
from trainformer.nn.cache import LayerKV
from trainformer.nn.embedding import apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]


CPU_BF16 = ("auto", "fp32", "sdpa")  # how bf16 attention runs on the CPU; see `sdpa`
# bf16 on the CPU: `matmul_attention` up to this many keys, fp32 SDPA above (the longest
# measured: benchmarks/speed/bench_attention.py, faster than the fp32 kernel at 8-512 keys,
# head dim 32 and 64, forward and forward+backward, padded and causal).
MATMUL_MAX_KEYS = 512


def matmul_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether bf16 attention of q (B, H, T, Dh) over k (B, KV, S, Dh) takes `matmul_attention` on the CPU."""
    return k.shape[2] <= MATMUL_MAX_KEYS


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, enable_gqa: bool = False, cpu_bf16: str = "auto") -> torch.Tensor:
    """`F.scaled_dot_product_attention` of q (B, H, T, Dh), k, v (B, KV, S, Dh) -> (B, H, T, Dh).

    bf16 inputs on the CPU, by `cpu_bf16`:
        "auto": `matmul_attention` in bf16 where it is the faster (`matmul_pays`: up to
            `MATMUL_MAX_KEYS` keys; its scores take B H T S bf16 values, kept for the
            backward), "fp32" elsewhere;
        "fp32": computed by SDPA in fp32 and cast back;
        "sdpa": SDPA's own bf16 kernel (benchmarks compare against it).
    Autocast, which would cast the inputs again, is paused for the call. Elsewhere SDPA runs as given.
    """
    if cpu_bf16 == "sdpa" or q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return _attend(q, k, v, attn_mask, is_causal, enable_gqa)
    with torch.autocast("cpu", enabled=False):
        if cpu_bf16 == "auto" and matmul_pays(q, k) and _heads_shared(attn_mask):
            return matmul_attention(q, k, v, attn_mask, is_causal)
        y = _attend(q.float(), k.float(), v.float(), attn_mask, is_causal, enable_gqa)
    return y.to(torch.bfloat16)


# A decoding step's attention: one query per row against the cached keys (self-attention),
# or a source's beams as one block of a few queries against its encoder memory (cross-
# attention). PyTorch's CPU SDPA kernel pays a fixed cost per (batch row, head); two
# batched GEMMs pay less once there are many such blocks and enough keys, and more below
# that (benchmarks/speed/bench_head_kernels.py, rows "attention"): `matmul_attention` there.
FEW_QUERY_MAX = 8  # queries per (row, head) block
ONE_QUERY_MIN_BLOCKS = 128  # rows x heads, one query each (a self-attention step)
FEW_QUERY_MIN_BLOCKS = 256  # rows x heads of 2..FEW_QUERY_MAX queries (a source's beams)
FEW_QUERY_MIN_SCORES = 16  # queries x keys per block: below it PyTorch's small-matrix bmm loop is slow


def few_query_pays(blocks: int, queries: int, keys: int) -> bool:
    """Whether `matmul_attention` beats SDPA on the CPU for `blocks` (row, head) pairs of
    `queries` queries against `keys` keys (see the thresholds above)."""
    min_blocks = ONE_QUERY_MIN_BLOCKS if queries == 1 else FEW_QUERY_MIN_BLOCKS
    return queries <= FEW_QUERY_MAX and blocks >= min_blocks and queries * keys >= FEW_QUERY_MIN_SCORES


def _attend(q, k, v, attn_mask, is_causal, enable_gqa) -> torch.Tensor:
    # Outside autograd only: the thresholds were measured on decoding steps, and training keeps
    # SDPA's fused backward.
    if (q.device.type == "cpu" and not is_causal and _is_key_mask(attn_mask, q) and native.outside_autograd(q, k, v)
            and not torch.is_autocast_enabled("cpu")
            and few_query_pays(q.shape[0] * q.shape[1], q.shape[2], k.shape[2])):
        return matmul_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=enable_gqa)


def _is_key_mask(mask: torch.Tensor | None, k: torch.Tensor) -> bool:
    """None, or a bool key padding mask (B, 1, 1, S) of k's batch (no query or head dimension)."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == k.shape[0]
                            and mask.shape[1] == mask.shape[2] == 1)


def _native_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool, cpu_bf16: str) -> bool:
    """A decoding step's attention on the CPU: a few queries per row, a key padding mask or none,
    no gradient recorded, eager: the C kernel of `trainformer.nn.native`, where it is built and
    pays (`native.pays`). bf16 inputs are computed in fp32 (unless a benchmark asked for SDPA's
    own bf16 kernel). On one thread it beats PyTorch's attention at the decoding shapes of
    bench_head_kernels.py but one (a source's 4 beams against 32-64 keys at 8-128 rows: 0.81-0.98x)."""
    return (q.device.type == "cpu" and not is_causal and q.shape[2] <= FEW_QUERY_MAX
            and native.takes(q, k, v) and (q.dtype == torch.float32 or cpu_bf16 != "sdpa")
            and _is_key_mask(attn_mask, k) and native.outside_autograd(q, k, v)
            and native.pays(q.numel() * k.shape[2]))


def _heads_shared(mask: torch.Tensor | None) -> bool:
    """None, or a bool mask of at most 4 dimensions whose head dimension, the second of
    (B, H, T, S) after broadcasting, is 1 (what `matmul_attention` takes)."""
    return mask is None or (mask.dtype == torch.bool and mask.dim() <= 4
                            and ((1,) * (4 - mask.dim()) + tuple(mask.shape))[1] == 1)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v as two batched GEMMs in q's dtype, the scores materialised.

    q (B, H, T, Dh), k, v (B, KV, S, Dh) with H a multiple of KV -> (B, H, T, Dh).
    attn_mask: bool, True = may attend, broadcastable to (B, 1, T, S) (no per-head
    mask, `_heads_shared`), or None; is_causal: query i sees keys j <= i (top-left, as
    SDPA's). The query heads that share a key/value head (GQA) and their queries form
    one (H / KV * T, Dh) block. Masks are additive biases: one shared by every row of
    the batch (the causal mask) is added by the scores' GEMM itself, a per-row
    one (key padding) in place after it. The softmax runs in q's dtype (PyTorch's
    bf16 softmax accumulates in fp32); a row with nothing to attend to is NaN.
    Differentiable, with its own backward (`_MatmulAttention`).
    """
    b, h, t, dh = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    shared, per_row = _score_biases(attn_mask, is_causal, g, t, s, q.dtype, q.device)
    q3, k3, v3 = q.reshape(b * kv, g * t, dh), k.reshape(b * kv, s, dh), v.reshape(b * kv, s, dh)
    args = (q3, k3, v3, shared, per_row, dh ** -0.5)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        y = _MatmulAttention.apply(*args)
    else:
        y = torch.bmm(_probabilities(*args[:2], *args[3:]), v3)
    return y.view(b, h, t, dh)  # (B KV, g T, Dh) is (B, H, T, Dh) in memory


def _probabilities(q: torch.Tensor, k: torch.Tensor, shared: torch.Tensor | None, per_row: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """softmax(scale q k^T + biases): q (N, M, Dh), k (N, S, Dh) -> (N, M, S); `shared` broadcasts
    to (M, S), `per_row` to (B, 1, M, S) over the (B, N / B, M, S) view of the scores."""
    if shared is None:  # beta=0: the scalar is not read, the GEMM writes alpha q k^T
        scores = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=scale)
    else:
        scores = torch.baddbmm(shared, q, k.transpose(1, 2), alpha=scale)  # (N, M, S)
    if per_row is not None:
        scores.view(per_row.shape[0], -1, *scores.shape[1:]).add_(per_row)
    return torch.softmax(scores, dim=-1)


class _MatmulAttention(torch.autograd.Function):
    """`matmul_attention` on 3-D blocks with a backward that never touches the masks: where
    a bias is -inf the probability is 0, and so is the softmax's gradient there."""

    @staticmethod
    def forward(ctx, q, k, v, shared, per_row, scale):  # q (N, M, Dh), k, v (N, S, Dh)
        p = _probabilities(q, k, shared, per_row, scale)  # (N, M, S)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return torch.bmm(p, v)  # (N, M, Dh)

    @staticmethod
    def backward(ctx, dy):  # dy (N, M, Dh)
        q, k, v, p = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dv = torch.bmm(p.transpose(1, 2), dy) if need_v else None  # (N, S, Dh)
        dq = dk = None
        if need_q or need_k:
            ds = torch._softmax_backward_data(torch.bmm(dy, v.transpose(1, 2)), p, -1, p.dtype)  # (N, M, S)
            dq = torch.bmm(ds, k).mul_(ctx.scale) if need_q else None
            dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale) if need_k else None
        return dq, dk, dv, None, None, None


def _score_biases(mask: torch.Tensor | None, is_causal: bool, groups: int, t: int, s: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The masks of `matmul_attention` as additive 0 / -inf biases over its (B KV, g T, S) scores:
    (shared (g T | 1, S) or None, per_row (B, 1, g T | 1, S) or None)."""
    shared = _causal_bias(t, s, groups, dtype, device) if is_causal else None
    if mask is None:
        return shared, None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (Bm, 1, Tm, S)
    if groups > 1 and m.shape[-2] > 1:  # per-query rows: one copy per head of the group
        m = m.repeat(1, 1, groups, 1)  # (Bm, 1, g T, S)
    bias = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, float("-inf"))
    if m.shape[0] > 1:
        return shared, bias
    bias = bias[0, 0]  # (g T | 1, S), the same for every row
    return (bias if shared is None else shared + bias), None


def _causal_bias(t: int, s: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(groups T, S): 0 where query i (of each of `groups` heads) may see key j <= i, else -inf."""
    allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril()
    return torch.zeros(t, s, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf")).repeat(groups, 1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; ``cross=True`` attends from x to an encoder memory.

    Parameters (checkpoint keys, see docs/parameter-names.md):
        self-attention: ``qkv`` (Linear D -> (H + 2 KV) Dh; rows are q, then k, then v), ``out``.
        cross-attention: ``q`` (D -> H Dh), ``kv`` (D -> 2 KV Dh; rows k then v), ``out``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = True,
        cross: bool = False,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = d_model // n_heads
        self.cross = cross
        q_dim, kv_dim = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(q_dim, d_model, bias=bias)
        self.cpu_bf16 = "auto"  # see `sdpa`; benchmarks set the other `CPU_BF16` modes to compare

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: Rope | None = None,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """Attend from x (B, T, D); returns (B, T, D).

        Args:
            memory: (B, S, D) keys/values source for cross-attention (unused once `cache` holds them).
            attn_mask: bool, broadcastable to (B, H, T, S); True = may attend.
            is_causal: let SDPA apply the causal mask itself (no cache, no attn_mask).
            rope: (cos, sin) from `RotaryEmbedding`, applied to q and k (self-attention only).
            cache: self-attention: new k/v are appended and all cached ones used;
                cross-attention: memory k/v are computed on first use and reused after;
                with ``cache.group`` = g > 1 each row of them serves g consecutive rows of x
                (a source's beams), whose queries are attended as one block.
        """
        if self.cross:
            q, k, v = self._cross_qkv(x, memory, cache)
        else:
            q, k, v = self._self_qkv(x, rope, cache)
        group = cache.group if cache is not None else 1
        if _native_takes(q, k, v, attn_mask, is_causal, self.cpu_bf16):
            y = native.decode_attention(q, k, v, attn_mask, group)  # (B, T, H*Dh) float32
            return self.out(y if q.dtype == torch.float32 else y.to(q.dtype))
        b, h, t, dh = q.shape
        if group > 1:  # the queries of `group` rows that share one row of k/v, as one block
            q = q.view(b // group, group, h, t, dh).transpose(1, 2).reshape(b // group, h, group * t, dh)
        y = sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
                 cpu_bf16=self.cpu_bf16)  # (B / g, H, g T, Dh)
        y = y.view(b // group, h, group, t, dh).permute(0, 2, 3, 1, 4)  # (B / g, g, T, H, Dh)
        return self.out(y.reshape(b, t, -1))  # (B, T, H*Dh) -> (B, T, D)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, Dh), a view

    def _self_qkv(self, x: torch.Tensor, rope: Rope | None, cache: LayerKV | None):
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)  # (B, T, *) views
        q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, P + T, Dh)
        return q, k, v

    def _cross_qkv(self, x: torch.Tensor, memory: torch.Tensor | None, cache: LayerKV | None):
        q = self._heads(self.q(x), self.n_heads)  # (B, H, T, Dh)
        if cache is not None and not cache.empty:
            return q, cache.k, cache.v
        if memory is None:
            raise ValueError("cross-attention needs `memory` (or a cache that already holds it)")
        k, v = self.kv(memory).chunk(2, dim=-1)  # (B, S, KV*Dh) each
        k, v = self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)  # (B, KV, S, Dh)
        if cache is not None:
            cache.k, cache.v = k, v
        return q, k, v


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Plain attention for tests: softmax(Q K^T / sqrt(Dh)) V with explicit masks.

    Args:
        q: (B, H, T, Dh); k, v: (B, KV, S, Dh) with H a multiple of KV (GQA: each
            group of H / KV query heads shares one key/value head).
        mask: bool broadcastable to (B, H, T, S), True = may attend.
        causal: query i sees keys j <= i + (S - T) (queries are the last T positions).
    Returns:
        (B, H, T, Dh). Rows with nothing to attend to are NaN.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, S, Dh)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    t, s = scores.shape[-2:]
    if causal:
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v

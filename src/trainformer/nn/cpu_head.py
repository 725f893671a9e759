"""The tied output head of CPU decoding: the same product, through a cached transpose of the weight.

`TokenEmbedding.attend` is ``F.linear(h, weight)``. For a few rows against a
(V, D) matrix, CPU GEMV kernels are slower than for the same product against
its contiguous (D, V) transpose, and the head is the largest matmul of a
decoding step (benchmarks/speed/bench_decode_profile.py compares both, row
"head via F.linear"). `TransposedHead` keeps that transpose, rebuilt whenever
the weight changes, at the cost of V x D floats of memory.
"""

from __future__ import annotations

import torch

FAST_HEAD_ROWS = 256  # decoding batches (batch 64 x beam 4); teacher-forced evaluation keeps the GEMM layout


class TransposedHead:
    """``h @ weight.T`` through a cached contiguous copy of ``weight.T``, where that is faster.

    Not a module: it holds no parameters and nothing of it is saved.

    Args:
        max_rows: the most rows of ``h`` it takes (0: none, always the plain ``F.linear``).
    """

    def __init__(self, max_rows: int = FAST_HEAD_ROWS):
        self.max_rows = max_rows
        self._cache: tuple[tuple, torch.Tensor] | None = None  # (the weight's version key, its transpose)

    def applies(self, h: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `h` (..., D) is a decoding batch it takes: on the CPU, no gradients, fp32
        without autocast, at most `max_rows` rows."""
        return (
            h.device.type == "cpu"
            and not torch.is_grad_enabled()
            and h.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not weight.is_inference()  # no version counter to tell when the copy is stale
            and h.numel() <= self.max_rows * h.shape[-1]
        )

    def __call__(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h (..., D), weight (V, D) -> logits (..., V)."""
        return h @ self._transposed(weight)  # (..., D) @ (D, V)

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """The (D, V) contiguous transpose of `weight`, rebuilt after the weight changes."""
        key = (weight._version, weight.data_ptr(), weight.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, weight.detach().t().contiguous())
        return self._cache[1]

"""The tied output head of CPU decoding: the same product, through a cached copy of the weight.

`TokenEmbedding.attend` is ``F.linear(h, weight)``, the largest matmul of a
decoding step. For a few rows against a (V, D) matrix, CPU GEMM kernels are
slower than for the same product against a copy laid out for them:

- on AVX-512 CPUs, oneDNN's linear with the weight prepacked once in its own
  blocked layout: in fp32 about 1.3x F.linear at 128 rows (batch 32 x beam 4)
  and 1.7-2x at 8-32 rows; under bf16 autocast (prepacked bf16 weight) 1.16x at
  128 rows and up to 1.8x at one row;
- elsewhere, and for one fp32 row, the contiguous (D, V) transpose ``h @ W.T``,
  up to `TRANSPOSED_HEAD_ROWS` rows (plain F.linear above).

`benchmarks/speed/bench_head_kernels.py` (rows "head") times all three per row
count. The copy costs V x D numbers of memory and is rebuilt whenever the weight
changes.
"""

from __future__ import annotations

import functools

import torch

from trainformer.nn import native

TRANSPOSED_HEAD_ROWS = 256  # the transpose beats F.linear up to here (batch 64 x beam 4), not on larger GEMMs


@functools.cache
def onednn_prepacked_linear() -> bool:
    """Whether this CPU takes the oneDNN-prepacked head: PyTorch built with oneDNN, on an
    AVX-512 CPU (where it was measured faster; asked once per process)."""
    return (torch.backends.mkldnn.is_available()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_pack(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (V, D) in `dtype`, laid out once in oneDNN's blocked format for `onednn_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)


def onednn_linear(h: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``h @ W.T`` through oneDNN, for W packed by `onednn_pack` (h in the packed dtype)."""
    return torch.ops.mkldnn._linear_pointwise(h, packed, None, "none", [], "")


def head_kernel(rows: int, dtype: torch.dtype) -> str:
    """The kernel `FastHead` runs for `rows` rows in `dtype` (fp32, or bf16 under autocast)."""
    if onednn_prepacked_linear() and (rows > 1 or dtype == torch.bfloat16):
        return "oneDNN prepacked"
    return "transposed" if dtype == torch.float32 and rows <= TRANSPOSED_HEAD_ROWS else "F.linear"


class FastHead:
    """``F.linear(h, weight)`` for CPU decoding through a cached, kernel-friendly copy of ``weight``.

    Not a module: it holds no parameters and nothing of it is saved.

    Args:
        max_rows: the most rows of ``h`` it takes (None: any; 0: none, always the plain ``F.linear``).
    """

    def __init__(self, max_rows: int | None = None):
        self.max_rows = max_rows
        self._key: tuple | None = None  # the weight's version key of the copies below
        self._copies: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (layout, dtype) -> copy of the weight

    def applies(self, h: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether it takes `h` (..., D): on the CPU, outside autograd, a plain fp32 weight (no tensor
        subclass), fp32 `h` without autocast or under bf16 autocast, at most `max_rows` rows."""
        return (
            h.device.type == "cpu"
            and native.outside_autograd(h, weight)
            and h.dtype == weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and _autocast_dtype() in (None, torch.bfloat16)
            and not weight.is_inference()  # no version counter to tell when the copy is stale
            and (self.max_rows is None or h.numel() <= self.max_rows * h.shape[-1])
        )

    def __call__(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h (..., D), weight (V, D) -> logits (..., V), in the dtype ``F.linear`` would give."""
        dtype = _autocast_dtype() or torch.float32
        kernel = head_kernel(h.numel() // h.shape[-1], dtype)
        if kernel == "oneDNN prepacked":
            return onednn_linear(h.to(dtype), self._copy(weight, "onednn", dtype))
        if kernel == "transposed":
            return h @ self._copy(weight, "transposed", dtype)  # (..., D) @ (D, V)
        return torch.nn.functional.linear(h, weight)  # under autocast: its own bf16 GEMM

    def _copy(self, weight: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """`weight` in `layout` ("transposed" or "onednn") and `dtype`, made on first use and again
        after the weight changes."""
        key = (weight._version, weight.data_ptr(), weight.device)
        if self._key != key:
            self._key, self._copies = key, {}
        if (layout, dtype) not in self._copies:
            w = weight.detach()
            self._copies[layout, dtype] = w.t().contiguous() if layout == "transposed" else onednn_pack(w, dtype)
        return self._copies[layout, dtype]


def _autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype in force, or None."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

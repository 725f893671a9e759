"""The C kernels of the CPU's hot paths (cpu_kernels.c), built on first use.

A decoding step:
- `decode_attention`: a decoding step attends a few queries per row (one new
  token, or a source's beams) to a few dozen cached keys. PyTorch's CPU
  attention kernels pay a fixed cost per (row, head) block that dominates at
  these shapes; the C loop does not, and it writes its output in the
  (N, T, H x Dh) layout the output projection takes, so no transpose copy follows.
- `logsumexp_block_max`: what beam search needs of the next-token logits (each
  row's log-sum-exp and the maxima of its blocks of words) in one pass, instead
  of a `log_softmax` over the whole (rows, vocabulary) matrix and a max over its blocks.
- `gelu_`: the feed-forward's GELU in place, on glibc's vector erf.

Training:
- `softmax_xent`: the label-smoothed cross-entropy of (rows, vocabulary) logits
  and its gradient, one pass per row (upcast, max, exponentials, the gradient
  written in the logits' dtype), rows split over torch's threads.

The source is compiled once per machine with the system's C compiler (``$CC``,
else ``cc`` / ``gcc``) for this CPU (``-march=native``) into
``~/.cache/trainformer/native`` (``$TRAINFORMER_CACHE``), and called through
`ctypes` (which releases the GIL, so Python threads can run a kernel side by side).
Without a compiler, or with ``TRAINFORMER_NATIVE=0``, PyTorch's kernels run
instead (same results up to float rounding); `available()` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from trainformer.paths import cache_dir
from trainformer.textio import warn

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-std=c99", "-shared", "-fPIC"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


_enabled = True  # see `disabled`
SMALL_WORK = 1 << 18  # see `pays`: a batch-1 or batch-4 beam step, not a batch of 32 x beam 4


def available() -> bool:
    """Whether the kernels are used: built and loaded (built now if they are not yet), not `disabled`."""
    return _enabled and _library() is not None


def outside_autograd(*tensors: torch.Tensor) -> bool:
    """No gradient recorded for `tensors` and no graph being compiled or traced: where a step may take
    a kernel that autograd and the tracers do not see (decoding, evaluation; not training)."""
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def pays(work: int) -> bool:
    """Whether a decoding step takes a kernel for `work` (multiply-adds or elements): where torch
    runs one thread, always; where it runs several, only up to `SMALL_WORK`. The kernels run on one
    thread, leaving torch's other threads idle (or spinning, under OpenMP's default wait policy)
    between its multi-threaded operators: `trainformer serve` on 2 threads, its clients on the same
    2 cores, served about a quarter fewer sentences/s at 32 clients with them on big batches
    (benchmarks/speed/bench_serve.py), and as many as without them with this rule."""
    return available() and (torch.get_num_threads() == 1 or work <= SMALL_WORK)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """PyTorch's kernels inside the block (benchmarks compare both in one process)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     group: int = 1) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for the queries of a decoding step, through the C kernel.

    Args:
        q: (N, H, T, Dh); k, v: (N / group, KV, S, Dh); float32 or bf16 (computed in float32: a bf16
            cache is copied to float; a bf16 variant of the loop was slower, docs/experiments.md),
            unit stride over Dh, H a multiple of KV (GQA); each row of k/v serves `group`
            consecutive rows of q.
        key_mask: bool (N / group, 1, 1, S), True = may attend, or None. No causal mask.
    Returns:
        (N, T, H * Dh) float32, contiguous.
    """
    lib = _loaded()
    q, k, v = q.float(), k.float(), v.float()
    n, h, t, dh = q.shape
    kv, s = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[3] != dh:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "k and v must match, with q's head size")
    if h % kv:
        raise ValueError(f"decode_attention: {h} query heads are not a multiple of {kv} key/value heads")
    if group < 1 or k.shape[0] * group != n:
        raise ValueError(f"decode_attention: {n} query rows are not {k.shape[0]} key rows x group {group}")
    out = torch.empty(n, t, h * dh, dtype=torch.float32)
    mask, mask_n = None, 0
    if key_mask is not None:
        rows = key_mask.reshape(key_mask.shape[0], s)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        mask, mask_n = rows.view(torch.uint8), rows.stride(0)
    status = lib.tf_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None, out.data_ptr(),
        n, h, t, s, dh, kv, group, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], mask_n, dh ** -0.5)
    if status != 0:
        raise MemoryError(f"native decoding attention: no memory for {s} keys")
    return out


def logsumexp_block_max(logits: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) float32 -> (log-sum-exp of each row (N,), max of each block of `block`
    consecutive words (N, V / block)), in one pass over each row; V a multiple of `block`.

    ``logits - lse[:, None]`` is ``log_softmax(logits)`` up to float rounding."""
    lib = _loaded()
    n, v = logits.shape
    if v % block or logits.stride(1) != 1 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError(f"logsumexp_block_max takes CPU float32 (N, V) rows, V a multiple of {block}")
    lse, block_max = torch.empty(n), torch.empty(n, v // block)
    lib.tf_logsumexp_block_max(logits.data_ptr(), lse.data_ptr(), block_max.data_ptr(), n, v, logits.stride(0), block)
    return lse, block_max


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """GELU (erf form) of a contiguous CPU float32 tensor, in place; returns it."""
    lib = _loaded()
    if not (x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu"):
        raise ValueError("gelu_ takes a contiguous CPU float32 tensor")
    lib.tf_gelu_(x.data_ptr(), x.numel())
    return x


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor, eps: float, ignore_index: int = -100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy of logits (N, V) and its gradient (N, V).

    ``F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=eps,
    ignore_index=ignore_index)`` and the gradient of that sum, in the logits' dtype
    (float32 or bf16; statistics in float32). Rows are split over torch's threads.

    Raises:
        ValueError: a label that is neither a class of V nor `ignore_index`.
    """
    lib = _loaded()
    n, v = logits.shape
    if not xent_takes(logits):
        raise ValueError("softmax_xent takes CPU float32 or bf16 (N, V) logits with unit stride over V")
    labels = labels.to(torch.int64).contiguous()
    grad, losses = torch.empty(n, v, dtype=logits.dtype), torch.empty(n)
    args = (logits.data_ptr(), logits.stride(0), int(logits.dtype == torch.bfloat16), labels.data_ptr(),
            ignore_index, eps, grad.data_ptr(), losses.data_ptr())
    statuses = _split_rows(lambda lo, hi: lib.tf_softmax_xent(*args, lo, hi, v), n, n * v)
    bad = [s for s in statuses if s != 0]
    if bad and min(bad) < 0:
        raise MemoryError(f"softmax_xent: no memory for a row of {v} floats")
    if bad:
        row = min(bad) - 1
        raise ValueError(f"label {labels[row].item()} of row {row} is not a class of the {v} logits "
                         f"(nor {ignore_index}, ignored)")
    return losses.sum(), grad


def xent_takes(logits: torch.Tensor) -> bool:
    """Whether `softmax_xent` takes these (N, V) logits: CPU float32 or bf16, unit stride over V."""
    return logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(1) == 1


PARALLEL_MIN_WORK = 1 << 20  # elements: below this a kernel runs on the calling thread alone


def _split_rows(run: Callable[[int, int], int], rows: int, work: int) -> list[int]:
    """`run(lo, hi)` over row ranges covering [0, rows), one per torch thread (the calling thread
    takes the first) where `work` is big enough to pay for the hand-off; their return values."""
    parts = min(torch.get_num_threads(), rows) if work >= PARALLEL_MIN_WORK else 1
    if parts <= 1:
        return [run(0, rows)]
    bounds = [rows * i // parts for i in range(parts + 1)]
    futures = [_pool(parts - 1).submit(run, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    return [run(bounds[0], bounds[1])] + [f.result() for f in futures]


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainformer-native")


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the tensors fit `decode_attention`: on the CPU, float32 or bf16, unit stride over the last
    dimension."""
    return all(x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.stride(-1) == 1
               for x in (q, k, v))


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see trainformer.nn.native)")
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernels, loaded; None (said once) where they cannot be built or are turned off."""
    if os.environ.get("TRAINFORMER_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warn("no C compiler found ($CC, cc, gcc): the CPU kernels stay PyTorch's")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        stderr = getattr(e, "stderr", None) or b""
        detail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
        warn(f"could not build the native CPU kernels with {compiler} ({detail[0]}); "
             "the CPU kernels stay PyTorch's")
        return None
    lib.tf_decode_attention.restype = ctypes.c_int
    lib.tf_decode_attention.argtypes = [_PTR] * 5 + [_I64] * 17 + [ctypes.c_float]
    lib.tf_logsumexp_block_max.restype = None
    lib.tf_logsumexp_block_max.argtypes = [_PTR] * 3 + [_I64] * 4
    lib.tf_gelu_.restype = None
    lib.tf_gelu_.argtypes = [_PTR, _I64]
    lib.tf_softmax_xent.restype = _I64
    lib.tf_softmax_xent.argtypes = [_PTR, _I64, ctypes.c_int, _PTR, _I64, ctypes.c_float, _PTR, _PTR, _I64, _I64, _I64]
    return lib


def _build(compiler: str) -> Path:
    """Compile SOURCE for this compiler and CPU once; later calls find the cached library.

    First with glibc's vector `expf` and `erff` (libmvec, glibc 2.35 and later), then, where
    that does not link, without them."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir("native") / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built)]
        try:
            subprocess.run([*command, "-DTF_VECTOR_MATH", "-Wl,--no-undefined", "-lmvec", "-lm"], check=True,
                           capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run([*command, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(built, target)
    return target


def _cpu_flags() -> str:
    """This CPU's feature flags (the build is for it: -march=native), or '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()

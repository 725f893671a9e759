"""Peak memory of a piece of work, measured where it can be measured honestly.

CUDA: `torch.cuda.max_memory_allocated` above what was allocated before the
work (activations, gradients, optimizer state and workspace).
CPU: PyTorch has no allocator statistics, and `tracemalloc` does not see
tensor memory, so the work runs in a fresh `spawn`ed process and we report
its RSS high-water mark above the RSS it had just before the work started
(`RssProbe`). It includes allocator caching and fragmentation.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MB = 1024 * 1024


class RssProbe:
    """The process's resident memory, MB: `start()` before the work, `peak()` after it.

    On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark
    (VmHWM) to the current RSS, so `peak() - start()` is exactly the rise
    caused by the work. Elsewhere we fall back to ru_maxrss, whose
    high-water mark may already be above the work's from start-up (then the
    rise reads as 0: a lower bound).
    """

    def __init__(self) -> None:
        self.linux = True  # False once /proc is found unusable

    def start(self) -> float:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._status("VmRSS")
        except OSError:
            self.linux = False
            return self._maxrss()

    def peak(self) -> float:
        return self._status("VmHWM") if self.linux else self._maxrss()

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def _maxrss() -> float:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def _child(fn: Callable[..., dict], kwargs: dict, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    try:
        result = fn(**kwargs, rss=RssProbe())
        queue.put(("ok", result))
    except Exception as e:  # reported to the parent, which records it for this section
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(fn: Callable[..., dict], kwargs: dict[str, Any], device: torch.device) -> dict:
    """Run `fn(**kwargs, rss=...)` where its memory can be measured, and return its dict.

    On CPU in a fresh spawned process with this process's thread count (`fn`
    must be a module-level function that measures its work with
    ``PeakMemory(device, rss)``). On CUDA in this process, with rss=None.
    """
    if device.type == "cuda":
        return fn(**kwargs, rss=None)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, kwargs, torch.get_num_threads(), queue))
    proc.start()
    status, result = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"isolated run failed: {result}")
    return result


class PeakMemory:
    """Measures the peak memory of the code inside ``with`` (see module docstring).

    After the block, `mb` is the peak in MB above the start, or None when it
    cannot be measured (CPU without an `RssProbe`, i.e. not in a fresh process).
    """

    def __init__(self, device: torch.device, rss: RssProbe | None):
        self.device, self.rss = device, rss
        self.mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.rss is not None:
            self._start = self.rss.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / MB
        elif self.rss is not None:
            self.mb = max(0.0, self.rss.peak() - self._start)


def memory_method(device: torch.device) -> str:
    """One line for the report: how peak memory was measured on `device`."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated above the allocation before the work "
                "(training step: one step after warm-up, weights and AdamW state excluded)")
    return ("CPU: RSS high-water mark (VmHWM, reset before the work) of a fresh process above its RSS "
            "before the work (training step: two steps of a freshly built model, AdamW state included); "
            "n/a where not measured (--quick training step)")

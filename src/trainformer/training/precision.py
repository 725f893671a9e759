"""Numeric precision: which dtype autocast uses, and whether a GradScaler is needed.

bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does
(Micikevicius et al. 2018, "Mixed Precision Training"), hence the scaler
only for fp16. Losses are computed in fp32 by `trainformer.training.loss`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainformer.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX).

    Without them bf16 matmuls are emulated: measured on an AVX2 EPYC (2 threads),
    a 512x512 bf16 `mm` ran at 1.4 GFLOP/s against 50 GFLOP/s in fp32.
    """
    cpu = torch.cpu
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, check, None)
        if fn is not None and fn():
            return True
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`train.precision` -> "fp32", "bf16" or "fp16" for this device.

    "auto": bf16 on a CPU with native bf16 (else fp32); on CUDA bf16 when the
    GPU supports it (Ampere and later), else fp16.
    """
    if name not in ("auto", *DTYPES):
        raise ConfigError(f"train.precision: expected auto, fp32, bf16 or fp16, got {name!r}")
    if device.type == "cpu":
        if name == "fp16":
            raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if name == "auto":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return name
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


@dataclass
class Precision:
    """The resolved precision of a run: autocast context and optional GradScaler."""

    name: str  # fp32, bf16, fp16
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: autocast to the low dtype, or nothing in fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 only (bf16/fp32 do not underflow gradients)."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def build_precision(name: str, device: torch.device) -> Precision:
    return Precision(resolve_precision(name, device), device)

"""Quantized models: int8 / bf16 versions of every Linear layer, saved without pickles.

`trainformer.compression` quantizes a trained model (`quantize_model`) and
writes the result; `trainformer.modeldir` rebuilds it (`load_quantized`).

Three methods (``compression.json``: ``{"quantized": true, "quantization": METHOD}``):

- ``dynamic``: int8 weights (per output channel, symmetric) with activations
  quantized on the fly per batch, by `torch.ao.quantization.quantize_dynamic`.
  Its fbgemm / oneDNN int8 GEMMs make it the fastest CPU path for batch-1
  decoding. CPU only (the kernels do not exist on CUDA).
- ``weight_only``: int8 weights + per-channel fp32 scales in `Int8WeightOnlyLinear`,
  dequantised on the fly; activations stay fp32/bf16. It halves memory
  traffic where the matmul is memory-bound (GPU decoding), but on a CPU
  without int8 kernels the int8 -> float conversion costs more than it saves
  (see benchmarks/compression/bench_compression.py).
- ``bf16``: the weights cast to bfloat16 (half the size), a baseline.

The token embedding, which is also the tied output projection (the largest
matmul of a decoding step), becomes an `Int8Embedding` for ``dynamic`` and
``weight_only``: int8 rows with one scale each (``compression.json``:
``"embedding": "int8"``). Position tables and norms stay in full precision.

Files: ``model.safetensors`` holds, per quantized Linear ``NAME``,
``NAME.weight_int8`` (out, in) int8, ``NAME.weight_scale`` (out,) and, for
``dynamic``, ``NAME.weight_zero_point`` (out,) (zero for symmetric weights),
plus ``NAME.bias``, ``tok_embed.weight_int8`` (V, D) and ``tok_embed.weight_scale`` (V,),
and every other tensor under its own name. Loading builds
the fp32 model from config.json, re-creates the quantized modules and copies
the int8 values in — no code is unpickled.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as AoDynamicLinear

from trainformer.config import Config
from trainformer.errors import UserError
from trainformer.textio import warn

METHODS = ("dynamic", "weight_only", "bf16")


# ----------------------------------------------------------------------------
# int8 weight-only Linear
# ----------------------------------------------------------------------------


class Int8WeightOnlyLinear(nn.Module):
    """A Linear with int8 weights and one fp32 scale per output channel (symmetric, zero point 0).

    ``y = (x @ W_int8^T) * scale + bias``: the scale is applied after the
    matmul (it is per output channel), so only the int8 -> float cast of the
    weight happens per call, not a scaled copy.
    State: ``weight_int8`` (out, in) int8, ``weight_scale`` (out,) float32, ``bias`` (out,) or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantize `linear`: scale = max |w| of the row / 127, q = round(w / scale)."""
        w = linear.weight.detach().float()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device)
        scale = w.abs().amax(dim=1) / 127.0  # (out,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row (pruned)
        new.weight_int8.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        new.weight_scale.copy_(scale)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().float())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = F.linear(x, self.weight_int8.to(x.dtype))  # (..., out); autocast may run it in bf16
        y = y * self.weight_scale.to(y.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """A token embedding held as int8 rows with one fp32 scale per row (symmetric), that
    is also the tied output projection (`attend`), like `TokenEmbedding`.

    A lookup dequantises only the rows it gathers. `attend` multiplies by the int8
    matrix with torch.ao's dynamic int8 GEMM (``dynamic=True``; CPU) or dequantises
    it inside the matmul (``weight_only``), as the Linear layers of each method do.
    State: ``weight_int8`` (V, D) int8, ``weight_scale`` (V,) float32.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float, dynamic: bool, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scale, self.dynamic = scale, dynamic
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))
        self._packed: tuple[int, dict[str, nn.Module]] | None = None  # (int8 buffer version, engine -> head)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, dynamic: bool) -> Int8Embedding:
        w = embedding.weight.detach().float()
        new = cls(w.shape[0], w.shape[1], float(getattr(embedding, "scale", 1.0)), dynamic, w.device)
        scale = w.abs().amax(dim=1) / 127.0  # (V,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        new.weight_int8.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        new.weight_scale.copy_(scale)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised (V, D) matrix, for code that needs the float weights (MLM heads)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D)."""
        # `F.embedding` gathers rows at a fraction of the cost of advanced indexing (a decoding step's lookup)
        x = F.embedding(ids, self.weight_int8).float() * F.embedding(ids, self.weight_scale[:, None])
        return x * self.scale if self.scale != 1.0 else x

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V)."""
        if self.dynamic:
            return self._dynamic_head(head_engine(h.numel() // h.shape[-1], self.num_embeddings))(h)
        y = F.linear(h, self.weight_int8.to(h.dtype))
        return y * self.weight_scale.to(y.dtype)

    def _dynamic_head(self, engine: str) -> nn.Module:
        """torch.ao's int8 Linear over the same int8 numbers, packed for `engine`; built on first
        use and again after the buffer changes (loading). Kept off the module tree: not saved twice."""
        version = self.weight_int8._version
        if self._packed is None or self._packed[0] != version:
            self._packed = (version, {})
        heads = self._packed[1]
        if engine not in heads:
            zeros = torch.zeros(self.num_embeddings, dtype=torch.long)
            scale = self.weight_scale.double().cpu()
            with _quiet_ao(), torch.inference_mode(False), _packing_engine(engine):
                qweight = torch.quantize_per_channel(self.weight.cpu(), scale, zeros, 0, torch.qint8)
                head = DynamicInt8Linear(self.embedding_dim, self.num_embeddings, bias_=False, dtype=torch.qint8)
                head.set_weight_bias(qweight, None)
            heads[engine] = head
        return heads[engine]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, dynamic={self.dynamic}"


ONEDNN_HEAD_MIN_OUTPUTS = 200_000  # rows x vocabulary from which the oneDNN head is the faster


def head_engine(rows: int, vocab: int) -> str:
    """The int8 kernel (torch.ao engine) for a tied output head of `rows` rows on this CPU.

    On AVX-512 CPUs oneDNN's int8 GEMM beats the default engine's (fbgemm) on large
    outputs — about 1.4x at 128 rows x 8,000 words, a batch-32 beam-4 step — and loses
    on small ones (about 0.75x at one row); the Linear layers of a decoding step stay
    on the default (`benchmarks/speed/bench_head_kernels.py`).
    """
    if rows * vocab < ONEDNN_HEAD_MIN_OUTPUTS or not _onednn_is_faster():
        return torch.backends.quantized.engine
    return "onednn"


@functools.cache
def _onednn_is_faster() -> bool:
    """Asked once per process: `head_engine` runs at every decoding step."""
    return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and "onednn" in torch.backends.quantized.supported_engines)


@contextmanager
def _packing_engine(engine: str) -> Iterator[None]:
    """Pack weights for `engine`; a packed weight then runs on its engine whatever is selected."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def int8_embedding(model: nn.Module, dynamic: bool) -> bool:
    """Replace the model's `tok_embed` by an `Int8Embedding`, in place; False if it has none."""
    embedding = getattr(model, "tok_embed", None)
    if not isinstance(embedding, nn.Embedding):
        return False
    model.tok_embed = Int8Embedding.from_embedding(embedding, dynamic)
    return True


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def weight_only_int8(model: nn.Module, empty: bool = False) -> nn.Module:
    """Replace every nn.Linear by an `Int8WeightOnlyLinear`, in place (``empty``: shells to load into)."""
    for name, linear in _linears(model):
        if empty:
            new = Int8WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                       linear.weight.device)
        else:
            new = Int8WeightOnlyLinear.from_linear(linear)
        _replace(model, name, new)
    return model


# ----------------------------------------------------------------------------
# int8 dynamic (torch.ao)
# ----------------------------------------------------------------------------


@contextmanager
def _quiet_ao() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated (torchao is its successor) but still
    ships and is still the fastest CPU int8 path without a new dependency; keep the CLI quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        yield


class DynamicInt8Linear(AoDynamicLinear):
    """torch.ao's dynamic int8 Linear that also accepts bf16 input.

    Under bf16 autocast (the inference verbs' default on CPUs with native bf16)
    its input may be bf16, but the int8 kernel takes fp32 only: the input is
    cast and the fp32 output returned, so q, k and v always agree in dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        packed = self._packed_params
        if packed.dtype != torch.qint8 or self.version is None or self.version < 4:
            return super().forward(x)
        # What torch.ao's forward runs for these weights, without its per-call branches and
        # dtype cast: a decoding step calls a few dozen of these, and at batch 1 their Python
        # is a visible share of a small layer's call.
        return torch.ops.quantized.linear_dynamic(x, packed._packed_params, reduce_range=True)


def dynamic_int8(model: nn.Module) -> nn.Module:
    """`quantize_dynamic` of every nn.Linear with per-channel int8 weights, in place (CPU)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.cpu().eval()
    with _quiet_ao():
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                mapping={nn.Linear: DynamicInt8Linear}, inplace=True)


def _dynamic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AoDynamicLinear)]


def _dynamic_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """int8 weights, scales and zero points of the quantized Linears; every other tensor as is."""
    quantized = dict(_dynamic_modules(model))
    out: dict[str, torch.Tensor] = {}
    for name, m in quantized.items():
        w, b = m.weight(), m.bias()
        if w.qscheme() != torch.per_channel_affine:
            raise RuntimeError(f"{name}: expected per-channel weights, got {w.qscheme()}")
        out[f"{name}.weight_int8"] = w.int_repr()
        out[f"{name}.weight_scale"] = w.q_per_channel_scales().double()  # exact: the kernel's own scales
        out[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().long()
        if b is not None:
            out[f"{name}.bias"] = b.detach().float()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if not any(owner == q or owner.startswith(q + ".") for q in quantized):
            out[key] = value
    return out


def _load_dynamic_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved int8 weights into the quantized modules (`set_weight_bias`); pops their entries."""
    for name, m in _dynamic_modules(model):
        try:
            q = state.pop(f"{name}.weight_int8")
            scale = state.pop(f"{name}.weight_scale").double()
            zero = state.pop(f"{name}.weight_zero_point").long()
        except KeyError:
            raise UserError(f"{path}: int8 weights of {name!r} are missing") from None
        bias = state.pop(f"{name}.bias", None)
        if q.shape != m.weight().shape:
            raise UserError(f"{path}: {name}.weight_int8 has shape {tuple(q.shape)}, the model "
                            f"expects {tuple(m.weight().shape)}")
        # Requantizing the exact dequantised values gives back the same int8 numbers
        # (rounding error << 0.5 step); public API instead of a private constructor.
        real = ((q.double() - zero[:, None]) * scale[:, None]).float()
        with _quiet_ao():
            qweight = torch.quantize_per_channel(real, scale, zero, 0, torch.qint8)
        m.set_weight_bias(qweight, bias.float() if bias is not None else None)


# ----------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize a dense fp32 model by `method` (dynamic, weight_only, bf16), in place; eval mode.

    Returns the model (dynamic int8 moves it to the CPU).
    """
    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    model.eval()
    if method == "dynamic":
        int8_embedding(dynamic_int8(model), dynamic=True)
        return model
    if method == "weight_only":
        int8_embedding(weight_only_int8(model), dynamic=False)
        return model
    return model.to(torch.bfloat16)


def quantized_state(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """Tensors to save for a model quantized with `method` (see the module docstring)."""
    if method == "dynamic":
        return _dynamic_state(model)
    return dict(model.state_dict())


def _expected_tensors(model: nn.Module, skip_modules: set[str]) -> dict[str, torch.Tensor]:
    """The model's own parameters and persistent buffers by state-dict key, a tied one under its
    first name only, leaving out those of the modules in `skip_modules`."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if not isinstance(tensor, torch.Tensor) or any(owner == m or owner.startswith(m + ".") for m in skip_modules):
            continue
        ptr = tensor.data_ptr() if tensor.numel() else id(tensor)
        if ptr not in seen:
            out[key] = tensor
        seen.add(ptr)
    return out


@torch.no_grad()
def _copy_tensors(model: nn.Module, state: dict[str, torch.Tensor], path: Path, skip_modules: set[str]) -> None:
    """Copy saved tensors into the model in place; a missing, extra or misshapen one is an error.

    (Not `load_state_dict`: torch's quantized modules insist on their own pickled-layout keys.)
    """
    own = _expected_tensors(model, skip_modules)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match config.json and compression.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, target in own.items():
        value = state[key]
        if value.shape != target.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(value)


def load_quantized(
    state: dict[str, torch.Tensor], cfg: Config, compression: dict[str, Any], path: Path,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The quantized model of a model dir (called by `trainformer.modeldir.load_model_dir`).

    Builds the fp32 model from `cfg` (per-layer sizes included), re-creates the
    quantized modules and copies the saved tensors into them.

    Args:
        state: the tensors of its model.safetensors (consumed).
        cfg: its config.json; compression: its compression.json.
        path: the weights file, for error messages.
        device: where to put it (None: CPU). ``dynamic`` always stays on the CPU.
    """
    from trainformer.models import build_model

    method = compression.get("quantization")
    if method not in METHODS:
        raise UserError(f"{path.parent / 'compression.json'}: 'quantization' must be one of "
                        f"{', '.join(METHODS)}, got {method!r}")
    model = build_model(cfg.model).eval()
    skip: set[str] = set()
    if method == "dynamic":
        dynamic_int8(model)
        _load_dynamic_weights(model, state, path)
        skip = {name for name, _ in _dynamic_modules(model)}
        if device is not None and torch.device(device).type != "cpu":
            warn(f"{path.parent}: int8 dynamic quantization runs on the CPU only; using the CPU")
    elif method == "weight_only":
        weight_only_int8(model, empty=True)
    else:
        model.to(torch.bfloat16)
    if compression.get("embedding") == "int8":  # (older quantized dirs kept a float embedding)
        int8_embedding(model, dynamic=method == "dynamic")
    _copy_tensors(model, state, path, skip)
    if method != "dynamic" and device is not None:
        model.to(device)
    return model.eval()

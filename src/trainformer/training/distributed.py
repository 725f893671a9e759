"""Data parallelism through torchrun: DDP by default, FSDP2 by configuration.

A process reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun). World size
1 needs no process group and no wrapper: the same trainer code runs with the
collectives below turning into no-ops. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainformer.config import ParallelConfig
from trainformer.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """This process's place in the job, from torchrun's environment (defaults: a single process)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, str(default))
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}: expected an integer, got {value!r}") from None

    return DistEnv(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))


def resolve_backend(name: str, device: torch.device) -> str:
    """`parallel.backend` "auto" -> NCCL on CUDA, gloo on CPU."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    return name


def init_process_group(env: DistEnv, cfg: ParallelConfig, device: torch.device) -> None:
    """Join torchrun's process group (once per process); nothing to do for a single process."""
    if not env.distributed or dist.is_initialized():
        return
    backend = resolve_backend(cfg.backend, device)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)


def shutdown() -> None:
    """Leave the process group at the end of a command."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Collectives that are no-ops in a single process
# ----------------------------------------------------------------------------


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max") across ranks; returns `tensor`."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------
# Wrapping a model
# ----------------------------------------------------------------------------


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated layers (`model.layers`, `model.decoder_layers`) that AC and FSDP apply to."""
    layers: list[nn.Module] = []
    for name in ("layers", "decoder_layers"):
        container = getattr(model, name, None)
        if isinstance(container, nn.ModuleList | nn.Sequential):
            layers.extend(container)
    return layers


def apply_fsdp(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2: shard each Transformer layer, then the root (embeddings, head).

    Per-layer units let one layer's all-gather overlap the previous layer's
    compute (torchtitan's recipe). Under bf16 the parameters are gathered in
    bf16 and gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in transformer_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_model(
    model: nn.Module, cfg: ParallelConfig, env: DistEnv, device: torch.device, precision: str
) -> nn.Module:
    """The model as trained: unchanged for one process, DDP or FSDP2 otherwise."""
    if not env.distributed:
        return model
    if cfg.strategy == "fsdp":
        return apply_fsdp(model, precision)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step.

    DDP has `no_sync()`; FSDP2 modules have `set_requires_gradient_sync()`.
    """
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


# ----------------------------------------------------------------------------
# Full (unsharded) state dicts for checkpoints, via torch.distributed.checkpoint
# ----------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU under the model's own names (rank 0; {} elsewhere
    when sharded). A collective under FSDP: every rank must call it. Strips the
    `_orig_mod.` / `module.` prefixes of compile and DDP."""
    return get_model_state_dict(model, options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights into a plain, DDP, compiled or FSDP2 model (every rank passes them)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (so it survives a change of wrapper)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

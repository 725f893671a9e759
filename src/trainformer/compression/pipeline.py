"""Model dir in, compressed model dir out: what `trainformer prune` and `trainformer quantize` do."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from trainformer.compression.magnitude import magnitude_prune, zero_masks
from trainformer.compression.store import (
    COMPRESSION_FILE,
    check_out_dir,
    dir_bytes,
    load_float_model,
    save_compressed,
    with_step,
)
from trainformer.compression.structured import structured_prune
from trainformer.config import Config
from trainformer.errors import UserError
from trainformer.modeldir import resolve_model_dir, save_model_dir
from trainformer.models import count_parameters
from trainformer.models.quantized import METHODS as QUANT_METHODS
from trainformer.models.quantized import Int8Embedding, quantize_model, quantized_state
from trainformer.models.shapes import model_shapes

PRUNE_METHODS = ("magnitude", "structured")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity: expected a fraction in [0, 1), got {sparsity}")


def calibration_run(model: nn.Module, cfg: Config, source: Path, batches: int,
                    recipe: str | None = None, overrides: list[str] | None = None) -> Callable[[], None]:
    """A function that runs `model` forward (no gradients) over the first `batches` training
    batches of its own task: the model's data, tokenizer and batching, as fine-tuning sees them."""
    import torch

    from trainformer.compression.finetune import finetune_config
    from trainformer.tasks import build_task

    task = build_task(finetune_config(cfg, source, 1, recipe, overrides))
    task.setup(None)

    def run() -> None:
        model.eval()
        stream = iter(task.train_batches())
        with torch.no_grad():
            for _ in range(batches):
                task.loss(model, next(stream))

    return run


def prune_model_dir(
    model_dir: str | Path,
    out: str | Path,
    method: str,
    sparsity: float,
    heads: bool = True,
    ffn: bool = True,
    finetune_steps: int = 0,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    calibrate: int = 0,
    distill: float = 0.0,
) -> dict[str, Any]:
    """Prune the model of `model_dir` and write it to `out`; returns a report (sizes, counts).

    Args:
        method: "magnitude" (global unstructured zeros, dense shapes) or "structured"
            (head groups and feed-forward neurons physically removed).
        sparsity: fraction of weights (magnitude) or of heads / neurons (structured) to remove.
        heads / ffn: structured only: which units to prune.
        finetune_steps: > 0 fine-tunes the pruned model on its task's data (see `finetune.finetune`).
        recipe / overrides / run_dir: for the fine-tuning run (and the calibration data).
        calibrate: structured only: > 0 scores units by their activations on this many
            training batches of the model's task instead of by weight norms.
        distill: > 0 fine-tunes against the unpruned model's predictions too, with this
            weight (knowledge distillation, see `compression.distill`); 0 = labels only.
    """
    if method not in PRUNE_METHODS:
        raise UserError(f"--method: expected one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    _check_sparsity(sparsity)
    if not (heads or ffn):
        raise UserError("prune: nothing to prune (both heads and feed-forward neurons excluded)")
    if calibrate < 0 or (calibrate and method != "structured"):
        raise UserError(f"--calibrate: expected a number of batches >= 1 for --method structured, got {calibrate}")
    if not 0.0 <= distill <= 1.0 or (distill and not finetune_steps):
        raise UserError(f"--distill: expected a weight in [0, 1] with --finetune-steps N, got {distill}")
    source, out = resolve_model_dir(model_dir), Path(out)
    check_out_dir(source, out)
    loaded = load_float_model(source)
    model, cfg = loaded.model, loaded.cfg
    if distill and cfg.model.crf:
        raise UserError(f"--distill: {source} is a CRF tagger, whose loss is the CRF's, not a per-token "
                        "distribution to distil; fine-tune it on labels only (leave out --distill)")
    params_before = count_parameters(model)
    teacher = copy.deepcopy(model) if distill else None  # the unpruned model, before pruning
    if method == "magnitude":
        stats, fields = magnitude_prune(model, sparsity), {}
    else:
        run = calibration_run(model, cfg, source, calibrate, recipe, overrides) if calibrate else None
        stats = structured_prune(model, sparsity, heads=heads, ffn=ffn, calibrate=run)
        cfg.model.layer_sizes = model_shapes(model)  # config.json alone records and builds the pruned shapes
        fields = {}
    step = {"op": "prune", "method": method, **stats}
    save_compressed(out, model, cfg, source, with_step(loaded.compression, step, **fields))
    if finetune_steps:
        from trainformer.compression.finetune import finetune

        masks = zero_masks(model) if method == "magnitude" else None
        summary = finetune(model, cfg, out, finetune_steps, recipe, overrides, run_dir, masks, teacher, distill)
        step["finetune"] = {"steps": summary.get("steps"), "distill": distill, "valid": summary.get("valid", {}),
                            "test": summary.get("test", {})}
        save_model_dir(model, cfg, out)
        compression = with_step(loaded.compression, step, **fields)
        (out / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2) + "\n", encoding="utf-8")
    return {
        "out": str(out), "method": method, "sparsity": sparsity, **stats,
        "params_before": params_before, "params_after": count_parameters(model),
        "bytes_before": dir_bytes(source), "bytes_after": dir_bytes(out),
        "finetune": step.get("finetune"),
    }


def quantize_model_dir(model_dir: str | Path, out: str | Path, method: str) -> dict[str, Any]:
    """Quantize the model of `model_dir` by `method` (dynamic, weight_only, bf16) into `out`.

    Works on pruned model dirs too (their per-layer shapes are kept).
    Returns a report (sizes before / after).
    """
    if method not in QUANT_METHODS:
        raise UserError(f"--method: expected one of {', '.join(QUANT_METHODS)}, got {method!r}")
    source, out = resolve_model_dir(model_dir), Path(out)
    check_out_dir(source, out)
    loaded = load_float_model(source)
    model = quantize_model(loaded.model, method)
    step = {"op": "quantize", "method": method,
            "scheme": "bfloat16 weights" if method == "bf16" else "int8 per-output-channel symmetric"}
    extra = {"embedding": "int8"} if isinstance(getattr(model, "tok_embed", None), Int8Embedding) else {}
    compression = with_step(loaded.compression, step, quantized=True, quantization=method, **extra)
    save_compressed(out, quantized_state(model, method), loaded.cfg, source, compression)
    return {"out": str(out), "method": method, "bytes_before": dir_bytes(source), "bytes_after": dir_bytes(out)}

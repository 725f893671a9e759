"""Pruning and quantization applied to a built model from outside.

    from trainformer.compression import prune_model_dir, quantize_model_dir
    prune_model_dir("runs/x/model", "runs/x-pruned", "structured", 0.25)
    quantize_model_dir("runs/x-pruned", "runs/x-pruned-int8", "dynamic")

- `magnitude`: global unstructured magnitude pruning (zeros, dense shapes).
- `structured`: attention head groups and feed-forward neurons physically removed.
- `shapes`: per-layer sizes saved in compression.json and `apply_saved_shapes` to rebuild them.
- `quantize`: int8 dynamic, int8 weight-only and bf16 weights; `load_quantized`.
- `finetune`: a short fine-tuning run of a pruned model with the one trainer.
- `store` / `pipeline`: compressed model dirs in and out (safetensors + JSON only).
"""

from trainformer.compression.magnitude import magnitude_prune
from trainformer.compression.pipeline import prune_model_dir, quantize_model_dir
from trainformer.compression.quantize import Int8WeightOnlyLinear, load_quantized, quantize_model
from trainformer.compression.shapes import apply_saved_shapes, model_shapes
from trainformer.compression.structured import structured_prune

__all__ = [
    "Int8WeightOnlyLinear", "apply_saved_shapes", "load_quantized", "magnitude_prune",
    "model_shapes", "prune_model_dir", "quantize_model", "quantize_model_dir", "structured_prune",
]

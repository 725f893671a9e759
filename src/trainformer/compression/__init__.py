"""Pruning and quantization applied to a built model from outside.

    from trainformer.compression import prune_model_dir, quantize_model_dir
    prune_model_dir("runs/x/model", "runs/x-pruned", "structured", 0.25)
    quantize_model_dir("runs/x-pruned", "runs/x-pruned-int8", "dynamic")

- `magnitude`: global unstructured magnitude pruning (zeros, dense shapes).
- `structured`: attention head groups and feed-forward neurons physically removed.
- (the per-layer sizes a pruned model keeps, `model.layer_sizes`, are built by
  `trainformer.models.shapes`; the int8 / bf16 layers and `quantize_model` are
  `trainformer.models.quantized`, so a model dir loads without this package)
- `finetune`: a short fine-tuning run of a pruned model with the one trainer.
- `store` / `pipeline`: compressed model dirs in and out (safetensors + JSON only).
"""

from trainformer.compression.magnitude import magnitude_prune
from trainformer.compression.pipeline import prune_model_dir, quantize_model_dir
from trainformer.compression.structured import structured_prune

__all__ = ["magnitude_prune", "prune_model_dir", "quantize_model_dir", "structured_prune"]

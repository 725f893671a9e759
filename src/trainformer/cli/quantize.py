"""`trainformer quantize MODEL_DIR --out DIR --method {dynamic,weight_only,bf16}`."""

from __future__ import annotations

from pathlib import Path

from trainformer.cli.common import add_model_verb


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "quantize", help="quantize a trained model (int8 dynamic, int8 weight-only, bf16)",
        description="Quantize every Linear layer of a model dir (pruned ones too). 'dynamic': int8 "
        "weights and int8 activations computed per batch (fastest on CPU, CPU only). "
        "'weight_only': int8 weights dequantised on the fly (smaller; faster only where memory-bound). "
        "'bf16': bfloat16 weights. The result is safetensors + JSON; every inference command "
        "accepts it.",
    )
    p.add_argument("--out", required=True, type=Path, help="the quantized model dir to write (new folder)")
    p.add_argument("--method", choices=["dynamic", "weight_only", "bf16"], default="dynamic")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.compression.pipeline import quantize_model_dir

    r = quantize_model_dir(args.model_dir, args.out, args.method)
    print(f"quantized ({r['method']}) -> {r['out']}")
    print(f"  model.safetensors: {r['bytes_before']:,} -> {r['bytes_after']:,} bytes "
          f"({r['bytes_after'] / max(r['bytes_before'], 1):.0%})")
    return 0

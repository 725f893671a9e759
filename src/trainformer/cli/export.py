"""`trainformer export MODEL_DIR --to hf|onnx|ctranslate2 --out DIR`: a model for other runtimes.

The output is written into a temporary sibling of `--out` and renamed into
place only when complete, so an interrupted or failed export leaves nothing
half-written behind; an existing non-empty `--out` is refused without `--force`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trainformer.cli.common import add_model_verb

TARGETS = ("hf", "onnx", "ctranslate2")


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "export", help="export a model to Hugging Face transformers, ONNX or CTranslate2",
        description="Write a trained model in another runtime's format: 'hf' a directory that "
        "transformers loads on its own (Pegasus / Marian for translation, GPT-2 for lm and chat, "
        "XLM-RoBERTa-XL for mlm and ner), 'onnx' graphs for onnxruntime, 'ctranslate2' a "
        "CTranslate2 model (converted from the hf export). Needs the export extra: "
        'pip install -e ".[export]".',
    )
    p.add_argument("--to", required=True, choices=TARGETS, help="target format")
    p.add_argument("--out", required=True, help="output directory (created; must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quantization", default="float32",
                   help="ctranslate2 only: weight type (float32, int8, int8_float32, int16, bfloat16, ...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.errors import UserError
    from trainformer.modeldir import load_model_dir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out {out}: not empty (pass --force to replace it)")
    if args.quantization != "float32" and args.to != "ctranslate2":
        raise UserError("--quantization: only for --to ctranslate2 (quantize torch models with 'trainformer quantize')")
    loaded = load_model_dir(args.model_dir)
    if not loaded.tokenizer_path.is_file():
        raise UserError(f"{loaded.path}: tokenizer.json is missing")
    notes = write_atomically(out, lambda tmp: _export(args.to, loaded, tmp, args.quantization))
    print(f"exported {loaded.path} ({loaded.cfg.task}, {loaded.cfg.model.family}) to {out} [{args.to}]")
    for note in notes or []:
        print(f"  not carried: {note}")
    return 0


def _export(to: str, loaded, tmp: Path, quantization: str):
    if to == "hf":
        from trainformer.interop.hf import export_hf

        return export_hf(loaded, tmp)
    if to == "onnx":
        from trainformer.interop.onnx_export import export_onnx

        export_onnx(loaded, tmp)
        return []
    from trainformer.interop.ct2 import export_ct2

    export_ct2(loaded, tmp, quantization)
    return []


def write_atomically(out: Path, write):
    """Call ``write(tmp)`` on an empty temporary sibling of `out`, then swap it in; returns write's value.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-export")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return result

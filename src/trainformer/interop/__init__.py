"""Models in and out of trainformer: Hugging Face Transformers layouts, ONNX graphs, CTranslate2.

`hf` maps our model dirs to and from `transformers` directories (export and
import), `onnx_export` writes ONNX graphs that onnxruntime runs, `ct2` converts
an HF export with CTranslate2's own converter and decodes with it. Every
optional dependency is imported inside the function that needs it, so a
missing one is a one-line error naming the `export` extra.
"""

from trainformer.errors import UserError

EXTRA_HINT = 'pip install -e ".[export]"'


def require(module: str):
    """Import an optional dependency, or a one-line error naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed; it comes with the export extra: {EXTRA_HINT}") from None

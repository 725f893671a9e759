"""Models in and out of trainformer: Hugging Face Transformers layouts, ONNX graphs, CTranslate2.

`hf` maps our model dirs to and from `transformers` directories (export and
import), `onnx_export` writes ONNX graphs that onnxruntime runs, `ct2` converts
an HF export with CTranslate2's own converter and decodes with it. Every
optional dependency is imported inside the function that needs it, so a
missing one is a one-line error naming the `export` extra.
"""

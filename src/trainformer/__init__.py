"""trainformer: efficient training of Transformer models, end to end."""

__version__ = "0.1.0"

"""Shared building blocks: embeddings, position encodings, attention, feed-forward, norms, layers,
the character CNN, init."""

from trainformer.nn.attention import MultiHeadAttention, reference_attention
from trainformer.nn.cache import KVCache, LayerKV
from trainformer.nn.char_cnn import CharCNN
from trainformer.nn.embedding import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    TokenEmbedding,
    apply_rotary,
    sinusoid_table,
)
from trainformer.nn.feedforward import FeedForward
from trainformer.nn.init import init_weights, scale_residual_projections
from trainformer.nn.layers import DecoderLayer, EncoderLayer
from trainformer.nn.masks import causal_mask, key_padding_mask, positions_for, self_attention_mask
from trainformer.nn.norm import make_norm

__all__ = [
    "CharCNN", "DecoderLayer", "EncoderLayer", "FeedForward", "KVCache", "LayerKV", "LearnedPositions",
    "MultiHeadAttention", "RotaryEmbedding", "SinusoidalPositions", "TokenEmbedding",
    "apply_rotary", "causal_mask", "init_weights", "key_padding_mask", "make_norm",
    "positions_for", "reference_attention", "scale_residual_projections",
    "self_attention_mask", "sinusoid_table",
]

"""Greedy search, beam search and sampling with the KV cache, shared by translation and chat."""

from trainformer.generation.beam import beam_translate, length_penalty_factor
from trainformer.generation.greedy import greedy_translate, length_limits
from trainformer.generation.sampling import (
    apply_repetition_penalty,
    filter_logits,
    generate,
    left_pad,
    sample_next,
)

__all__ = [
    "apply_repetition_penalty", "beam_translate", "filter_logits", "generate", "greedy_translate",
    "left_pad", "length_limits", "length_penalty_factor", "sample_next",
]

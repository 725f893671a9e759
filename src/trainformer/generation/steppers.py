"""Next-token logits for a growing batch of sequences, with or without the KV cache.

Greedy search, beam search and sampling all drive a stepper: they hand it
the whole token matrix so far (N, t) and get the logits of the next token
(N, V). The cached stepper feeds only the tokens it has not seen yet; the
uncached one re-runs the full prefix (the slow path, kept so tests can
check the cache token for token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout) without gradients; restore each model's mode after.

    `torch.no_grad`, not `inference_mode`: under inference_mode autocast does not
    cache its bf16 copies of the weights, so every decoding step would cast every
    weight again (half the time of a bf16 batch-1 step on the CPU).

    Only a model with a submodule in training mode is switched (and switched back): `train()`
    sets the flag module by module through `nn.Module.__setattr__`, twice per call, a visible
    share of a batch-1 decoding call's time in profiles.
    """
    switched = [m for m in models if any(sub.training for sub in m.modules())]
    was_training = [m.training for m in switched]
    for m in switched:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(switched, was_training):
            m.train(mode)


class EncDecStepper:
    """Decoder steps of an `EncoderDecoder` over a batch of sources, encoded once."""

    def __init__(self, model: nn.Module, src: torch.Tensor, src_mask: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.memory = model.encode(src, src_mask)  # (B, S, D), computed once per source
        self.src_mask = src_mask
        self.cache = model.new_cache() if use_cache else None
        self.fed = 0

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, t) so far -> logits (N, V) of token t + 1 (float32)."""
        if self.cache is None:
            return self.model.decode(tokens, self.memory, self.src_mask)[:, -1].float()
        new, self.fed = tokens[:, self.fed :], tokens.shape[1]
        out = self.model.decode(new, self.memory, self.src_mask, cache=self.cache)[:, -1].float()
        self.memory = None  # the cache now holds the cross-attention K/V; memory is not needed again
        return out

    def expand(self, index: torch.Tensor, beam: int) -> None:
        """Each source's one row becomes `beam` rows: index (B * beam,) = each source's row, repeated.

        With the cache the beams share their source's cross-attention K/V instead of copying them.
        """
        if self.cache is None:
            self.select(index)
            return
        self.cache.share_cross(beam)
        self.cache.select(index, cross=False)

    def select(self, index: torch.Tensor, same_source: bool = False) -> None:
        """Row i becomes old row index[i]. ``same_source``: rows only move between beams of one source."""
        if self.cache is not None:
            self.cache.select(index, cross=not same_source)
            return
        self.memory = self.memory.index_select(0, index)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, index)


class DecoderStepper:
    """Steps of a `Decoder` continuing left-padded prompts (B, T) with mask (B, T) or None."""

    def __init__(self, model: nn.Module, prompt_mask: torch.Tensor | None, use_cache: bool):
        self.model = model
        self.prompt_mask = prompt_mask
        self.cache = model.new_cache() if use_cache else None
        self.fed = 0

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, T + t): prompt then generated tokens -> logits (N, V) of the next one."""
        if self.cache is None:
            return self.model(tokens, mask=self._mask(tokens))[:, -1].float()
        new = tokens[:, self.fed :]
        mask = self.prompt_mask if self.fed == 0 else None  # the cache remembers the prompt's padding
        self.fed = tokens.shape[1]
        return self.model(new, mask=mask, cache=self.cache)[:, -1].float()

    def select(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (rows that finished leave the batch)."""
        if self.cache is not None:
            self.cache.select(index)
        if self.prompt_mask is not None:
            self.prompt_mask = self.prompt_mask.index_select(0, index)

    def _mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.prompt_mask is None:
            return None
        extra = tokens.shape[1] - self.prompt_mask.shape[1]
        ones = self.prompt_mask.new_ones(tokens.shape[0], extra)
        return torch.cat([self.prompt_mask, ones], dim=1)  # (N, T + t)

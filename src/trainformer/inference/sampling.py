"""Sampled continuations of a trained `Decoder` (lm and chat models).

`SamplingSettings` are the flags of ``trainformer chat`` and ``generate``;
`sample_ids` samples a batch of token prompts under them; `StreamDecoder`
turns the tokens into printable text as they come; `prompt_ids` starts a
plain continuation as pretraining starts a document. `TorchGenerator` keeps
one seeded generator for a whole session: it is the `SamplingEngine` of a
`Chatbot` on our model, as `interop.ct2.Ct2Generator` is on a CTranslate2 export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from trainformer.data.tokenizer import EOS_ID, TextTokenizer
from trainformer.errors import UserError
from trainformer.generation import generate
from trainformer.inference.common import inference_autocast
from trainformer.textio import warn


@dataclasses.dataclass
class SamplingSettings:
    """How replies and continuations are sampled (the CLI flags of `chat` and `generate`)."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 64
    seed: int = 0

    def check(self) -> SamplingSettings:
        if self.temperature < 0:
            raise UserError(f"--temperature: expected a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k: expected an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p: expected a number in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty: expected a number > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: expected an integer >= 1, got {self.max_new_tokens}")
        return self


class StreamDecoder:
    """Generated ids in, printable text out, one token at a time.

    A byte-level BPE token can end inside a multi-byte character; its text
    is held back (no U+FFFD is ever printed) until the character completes.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        """Add a token; returns the text that can now be printed (maybe empty)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def sample_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    eos_id: int,
    generator: torch.Generator | None = None,
    stream: Callable[[int, int], None] | None = None,
    precision: str = "auto",
) -> list[list[int]]:
    """Sampled continuations of token `prompts` (batched), stopping at `eos_id`."""
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    with inference_autocast(device, precision, rows=len(prompts)):
        return generate(
            model, [list(p) for p in prompts], settings.max_new_tokens, eos_id,
            temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty, generator=generator, stream=stream,
        )


def prompt_ids(tokenizer: TextTokenizer, text: str, max_len: int, max_new_tokens: int) -> list[int]:
    """Ids of a continuation prompt: ``</s>`` then the text (as a document start in pretraining),
    cut from the left (with a warning) to leave room for `max_new_tokens` in the window."""
    ids = [EOS_ID, *tokenizer.encode(text)]
    room = max(max_len - min(max_new_tokens, max_len // 2), 1)
    if len(ids) > room:
        warn(f"the prompt has {len(ids)} tokens; only its last {room} are used (model window {max_len})")
        ids = ids[-room:]
    return ids


class SamplingEngine(Protocol):
    """What writes a `Chatbot`'s replies: `TorchGenerator` or `interop.ct2.Ct2Generator`."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings,
        end_id: int,
        stream: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Per prompt, the sampled ids without `end_id`; ``stream(row, token)`` sees each as it comes."""
        ...


class TorchGenerator:
    """`sample_ids` on our model with one generator, seeded once, for a whole session.

    Args:
        model: a `Decoder` (lm or chat); seed: seeds the session's generator, so the same
            seed and inputs give the same samples; precision: autocast precision.
    """

    def __init__(self, model: nn.Module, seed: int = 0, precision: str = "auto"):
        self.model, self.precision = model, precision
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings,
        end_id: int,
        stream: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Per prompt, the sampled ids without `end_id` (see `SamplingEngine.generate`)."""
        return sample_ids(self.model, prompts, settings, end_id, self.generator, stream, self.precision)

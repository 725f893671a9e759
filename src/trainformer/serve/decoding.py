"""Batched generation for the server: many replies in one KV-cached batch, each with its own settings.

`trainformer.generation.generate` samples a batch with one generator and one
set of settings. A server batch mixes requests with different temperatures,
seeds, stop strings and lengths, and each must come out as it would alone.
So here every row (`GenRow`) has its own `torch.Generator` (seeded from its
request), settings, token limit and stop strings, and draws exactly what
`generate` would draw for it alone: one uniform number per step, through the
same `sample_next` and `apply_repetition_penalty`. The prompts are left-padded
with a mask (positions count real tokens only, see `nn.masks.positions_for`),
and a finished row leaves the batch with its KV-cache rows. A row's tokens
therefore do not depend on its companions, up to float rounding of the
padded matmuls: exactly equal in our tests, for greedy and seeded sampling.

`ReplyText` turns a row's tokens into text as they come, holding back what
may still change: an unfinished UTF-8 character, and the start of a stop
string (it is never shown if the stop string completes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainformer.data.tokenizer import TextTokenizer
from trainformer.generation import apply_repetition_penalty, left_pad, sample_next
from trainformer.generation.steppers import DecoderStepper, eval_mode
from trainformer.inference.common import inference_autocast


@dataclass(frozen=True)
class RowSampling:
    """How one row picks its tokens (temperature 0 = greedy; top_k 0 and top_p 1 = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0


class ReplyText:
    """The text of one reply, growing token by token.

    Args:
        tokenizer: decodes the ids (special tokens dropped).
        stops: stop strings; the reply ends before the first one that appears.
        strip: strip surrounding whitespace (chat replies, as `Chatbot.reply` does).
    """

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str] = (), strip: bool = False):
        self.tokenizer, self.stops, self.strip = tokenizer, tuple(stops), strip
        self.ids: list[int] = []
        self.raw = ""
        self.shown = ""  # what has been handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that can be shown now (maybe empty)."""
        self.ids.append(int(token))
        raw = self.tokenizer.decode(self.ids)
        cut = min((i for i in (raw.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.raw, self.stopped = raw[:cut], True
            return ""
        self.raw = raw
        visible = raw.rstrip("\ufffd")  # a character whose bytes are not all there yet
        visible = visible[: len(visible) - self._stop_prefix(visible)]
        if self.strip:
            visible = visible.strip()  # trailing spaces wait until more text follows them
        return self._advance(visible)

    def close(self) -> str:
        """The reply is over: returns the rest of its text."""
        return self._advance(self.raw.strip() if self.strip else self.raw)

    @property
    def text(self) -> str:
        """The reply so far; after `close`, the whole reply (exactly what was handed out)."""
        return self.shown

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.shown):
            return ""  # never happens with byte-level BPE; what was sent cannot be taken back
        delta, self.shown = visible[len(self.shown):], visible
        return delta


@dataclass(eq=False)
class GenRow:
    """One reply being generated: its prompt, limit, settings, seed and text.

    `cap` is the most new tokens (the request's max_tokens, and what fits the
    window: ``model.max_len - len(prompt)``, as `generate` allows). `owner`
    and `index` say whose reply it is (a job and its choice number).
    """

    prompt: list[int]
    cap: int
    sampling: RowSampling
    seed: int
    text: ReplyText
    owner: Any = None
    index: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def batch_fits(rows: Sequence[GenRow], window: int) -> bool:
    """True when every row can reach its `cap` in one batch of `rows`: the cache is as long as
    the longest prompt plus the steps taken, and the model takes at most `window` positions."""
    width = max(len(r.prompt) for r in rows)
    return all(width + r.cap - 1 <= window for r in rows)


def pick_tokens(logits: torch.Tensor, seen: torch.Tensor, rows: Sequence[GenRow]) -> torch.Tensor:
    """Next token of each row: logits (A, V), seen (A, V) bool -> (A,) long.

    Greedy rows are one argmax; every other row is sampled on its own, with
    its own generator, exactly as `generate` samples a batch of one.
    """
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.sampling.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    for i, row in enumerate(rows):
        s = row.sampling
        if s.greedy:
            continue
        row_logits = apply_repetition_penalty(logits[i : i + 1], seen[i : i + 1], s.repetition_penalty)
        out[i] = sample_next(row_logits, s.temperature, s.top_k, s.top_p, row.generator)[0]
    return out


def decode_rows(
    model: nn.Module,
    rows: Sequence[GenRow],
    eos_id: int,
    precision: str = "auto",
    on_text: Callable[[GenRow, str], None] | None = None,
    on_finish: Callable[[GenRow], None] | None = None,
    cancelled: Callable[[GenRow], bool] | None = None,
) -> None:
    """Generate every row of `rows` (a `Decoder` and left-padded prompts), in one batch.

    Args:
        eos_id: a row ends when it generates this token (not part of its text).
        on_text: called with each piece of text a row can show (streaming).
        on_finish: called once per row when it ends; ``row.finish_reason`` is ``stop`` (eos
            or a stop string), ``length`` (its cap) or ``cancelled``.
        cancelled: asked after each step; True drops the row.
    """
    window = model.cfg.max_len
    if not rows:
        return
    if not batch_fits(rows, window):
        raise ValueError("rows do not fit one batch (see batch_fits)")
    device = next(model.parameters()).device
    for row in rows:
        if not row.sampling.greedy:
            row.generator = torch.Generator(device=device).manual_seed(row.seed % (1 << 64))
    tokens, mask = left_pad([r.prompt for r in rows])  # (B, T) each
    tokens, mask = tokens.to(device), mask.to(device)
    alive = list(rows)
    with eval_mode(model), inference_autocast(device, precision, rows=len(rows)):
        stepper = DecoderStepper(model, mask, use_cache=True)
        seen = torch.zeros(len(rows), model.cfg.vocab_size, dtype=torch.bool, device=device)  # (A, V)
        seen.scatter_(1, tokens, mask)  # padding does not count as seen
        while alive:
            nxt = pick_tokens(stepper.logits(tokens), seen, alive)  # (A,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (A, t)
            seen.scatter_(1, nxt[:, None], True)
            keep = []
            for i, (row, token) in enumerate(zip(alive, nxt.tolist())):
                _step_row(row, token, eos_id, on_text, cancelled)
                if row.done:
                    if on_finish is not None:
                        on_finish(row)
                else:
                    keep.append(i)
            if len(keep) < len(alive) and keep:
                index = torch.tensor(keep, device=device)
                stepper.select(index)
                tokens, seen = tokens[index], seen[index]
            alive = [alive[i] for i in keep]


def _step_row(row: GenRow, token: int, eos_id: int, on_text, cancelled) -> None:
    if cancelled is not None and cancelled(row):
        row.finish_reason = "cancelled"
        return
    if token == eos_id:
        row.finish_reason = "stop"
    else:
        piece = row.text.push(token)
        if piece and on_text is not None:
            on_text(row, piece)
        if row.text.stopped:
            row.finish_reason = "stop"
        elif len(row.text.ids) >= row.cap:
            row.finish_reason = "length"
    if row.done:
        rest = row.text.close()
        if rest and on_text is not None:
            on_text(row, rest)

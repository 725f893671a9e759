"""The chat template: role markers as special tokens, rendering with a loss mask, history fitting.

A conversation is rendered as

    [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

where each marker is one special token (never split, never produced by
ordinary text) and each text is encoded with the model's byte-level BPE. The
loss mask is True on the tokens the model learns to produce: the text of the
assistant turns and their ``<|end|>`` (so it learns to stop) — never on the
user or system text, nor on the ``<|assistant|>`` marker the prompt supplies.

`lm-pretrain` reserves the four markers in its tokenizer, so a chat model
fine-tuned from it needs no resized embedding (see `tasks/chat.py`).
Everything here works on token ids and needs no model, so it sits with the
data: the chat task renders its training examples with it, `inference.chatbot`
its prompts, `serve` its requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from trainformer.data.tokenizer import TextTokenizer
from trainformer.errors import DataError

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_SPECIAL_TOKENS = (SYSTEM, USER, ASSISTANT, END)
Role = Literal["system", "user", "assistant"]
ROLE_MARKERS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Message:
    role: Role
    text: str


@dataclass
class Rendered:
    """Token ids of a conversation and, per token, whether it carries loss."""

    ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: Sequence[int], loss: bool | Sequence[bool]) -> None:
        self.ids.extend(ids)
        self.loss_mask.extend([loss] * len(ids) if isinstance(loss, bool) else loss)


def reserve_chat_tokens(tokenizer: TextTokenizer) -> list[int]:
    """Add the four role markers to `tokenizer` (no-op for those it has); returns their ids."""
    return tokenizer.add_special_tokens(list(CHAT_SPECIAL_TOKENS))


def has_chat_tokens(tokenizer: TextTokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in CHAT_SPECIAL_TOKENS)


def sanitize(text: str) -> str:
    """User text with marker look-alikes defused, so typed ``<|end|>`` stays text, not a marker."""
    for marker in CHAT_SPECIAL_TOKENS:
        text = text.replace(marker, marker.replace("<|", "< |"))
    return text


class ChatTemplate:
    """Renders messages with `tokenizer` (which must hold the role markers)."""

    def __init__(self, tokenizer: TextTokenizer):
        if not has_chat_tokens(tokenizer):
            raise DataError(
                "tokenizer has no chat role markers "
                f"({', '.join(CHAT_SPECIAL_TOKENS)}); add them with reserve_chat_tokens()"
            )
        self.tokenizer = tokenizer
        self.role_id = {role: tokenizer.token_to_id(m) for role, m in ROLE_MARKERS.items()}
        self.end_id = tokenizer.token_to_id(END)
        self.role_of_id = {i: role for role, i in self.role_id.items()}

    # ------------------------------------------------------------- tokens
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(sanitize(text.strip()))

    def turn(self, role: Role, text_ids: Sequence[int]) -> Rendered:
        """One turn from already-encoded text: marker, text, ``<|end|>`` (+ its loss mask)."""
        learn = role == "assistant"
        out = Rendered()
        out.extend([self.role_id[role]], False)
        out.extend(list(text_ids), learn)
        out.extend([self.end_id], learn)
        return out

    def turn_length(self, text_ids: Sequence[int]) -> int:
        return len(text_ids) + 2  # marker + text + end

    def generation_prompt(self) -> list[int]:
        """What follows the history when the model is to answer: the assistant marker."""
        return [self.role_id["assistant"]]

    # ------------------------------------------------------------ messages
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> Rendered:
        """Ids and loss mask of `messages`; with `add_generation_prompt`, ends with ``<|assistant|>``."""
        out = Rendered()
        for msg in messages:
            part = self.turn(msg.role, self.encode_text(msg.text))
            out.extend(part.ids, part.loss_mask)
        if add_generation_prompt:
            out.extend(self.generation_prompt(), False)
        return out

    def parse(self, ids: Sequence[int]) -> list[Message]:
        """The inverse of `render`: messages from ids (an unfinished last turn is kept)."""
        messages: list[Message] = []
        role: Role | None = None
        text: list[int] = []
        for i in ids:
            if i in self.role_of_id:
                role, text = self.role_of_id[i], []
            elif i == self.end_id and role is not None:
                messages.append(Message(role, self.tokenizer.decode(text)))
                role = None
            elif role is not None:
                text.append(i)
        if role is not None and text:
            messages.append(Message(role, self.tokenizer.decode(text)))
        return messages

    def fit(
        self, messages: Sequence[Message], budget: int
    ) -> tuple[list[Message], int]:
        """Drop the oldest turns until the rendered prompt (+ generation prompt) fits `budget` tokens.

        The system line (a leading ``system`` message) is always kept, and the
        newest message is never dropped; turns go in user/assistant pairs so the
        kept history still starts with a user turn. Returns (kept messages,
        number of messages dropped); the result can still exceed `budget` when
        the system line and the newest message alone do — truncate the message.
        """
        system = [m for m in messages[:1] if m.role == "system"]
        turns = list(messages[len(system):])
        lengths = [self.turn_length(self.encode_text(m.text)) for m in turns]
        fixed = sum(self.turn_length(self.encode_text(m.text)) for m in system) + 1
        start = 0
        while start < len(turns) - 1 and fixed + sum(lengths[start:]) > budget:
            start += 2 if turns[start].role == "user" and start + 2 < len(turns) else 1
        return system + turns[start:], start


def fit_window(lengths: Sequence[int], end: int, budget: int, step: int = 2) -> int | None:
    """First turn index s (stepping back from ``end - 1`` by `step`) with sum(lengths[s:end+1]) <= budget.

    For training examples: turns alternate user/assistant, `end` is an
    assistant turn, and the example must start with the user turn before it
    at the latest. Returns None when even that pair does not fit.
    """
    start = end - 1
    total = sum(lengths[start : end + 1])
    if total > budget:
        return None
    while start - step >= 0 and total + sum(lengths[start - step : start]) <= budget:
        total += sum(lengths[start - step : start])
        start -= step
    return start

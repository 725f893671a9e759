"""A conversation with a chat model: history, window fitting, sampled and streamed replies."""

from __future__ import annotations

from collections.abc import Callable

from trainformer.data.chat_template import ChatTemplate, Message
from trainformer.data.tokenizer import TextTokenizer
from trainformer.errors import UserError
from trainformer.inference.sampling import SamplingEngine, SamplingSettings, StreamDecoder
from trainformer.textio import warn


class Chatbot:
    """A conversation with a chat model, whose replies `engine` samples.

    Args:
        engine: writes the replies: a `TorchGenerator` on our model, or a CTranslate2
            `Ct2Generator`; it holds the session's seeded generator, so the same seed and
            inputs give the same replies.
        tokenizer: the model's tokenizer (with role markers).
        window: the model's window (``model.max_len``); prompts are fitted into it with
            room left for a reply of `settings.max_new_tokens`.
        settings: sampling.
        system: an optional system line, kept through every truncation.
    """

    def __init__(self, engine: SamplingEngine, tokenizer: TextTokenizer, window: int,
                 settings: SamplingSettings, system: str | None = None):
        self.engine, self.settings = engine, settings.check()
        self.template = ChatTemplate(tokenizer)
        self.window = window
        self.reserve = min(settings.max_new_tokens, self.window // 2)  # room left for the reply
        self.system = [Message("system", system)] if system else []
        self.history: list[Message] = []
        self.dropped = 0  # messages dropped from the start of the history so far

    def reset(self) -> None:
        self.history = []

    def _fit_user_text(self, text: str) -> str:
        """`text` cut so that the system line, it and a reply fit the window (with a warning)."""
        ids = self.template.encode_text(text)
        fixed = sum(self.template.turn_length(self.template.encode_text(m.text)) for m in self.system)
        room = self.window - self.reserve - fixed - 3  # user marker, end, assistant marker
        if room < 1:
            raise UserError(f"--system: the system line leaves no room in the {self.window}-token window")
        if len(ids) <= room:
            return text
        warn(f"your message has {len(ids)} tokens; only its first {room} fit the model's window")
        return self.template.tokenizer.decode(ids[:room])

    def prompt(self, text: str) -> tuple[list[int], list[Message]]:
        """Prompt ids for a new user message, and the messages they hold (oldest dropped to fit)."""
        messages = [*self.system, *self.history, Message("user", self._fit_user_text(text))]
        kept, dropped = self.template.fit(messages, self.window - self.reserve)
        self.dropped += dropped
        ids = self.template.render(kept, add_generation_prompt=True).ids
        return ids, kept[len(self.system):]

    def reply(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to `text`; `stream(piece)` gets the text as it is generated.

        The exchange joins the history only when the reply completes, so a
        reply cancelled with Ctrl-C (KeyboardInterrupt) leaves no trace.
        """
        ids, kept = self.prompt(text)
        decoder = StreamDecoder(self.template.tokenizer)

        def on_token(row: int, token: int) -> None:
            piece = decoder.push(token)
            if piece:
                stream(piece)

        out = self.engine.generate([ids], self.settings, self.template.end_id,
                                   on_token if stream is not None else None)[0]
        answer = self.template.tokenizer.decode(out).strip()
        self.history = [*kept, Message("assistant", answer)]
        return answer

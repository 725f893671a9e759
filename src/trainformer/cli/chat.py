"""`trainformer chat MODEL_DIR`: talk to a chat model in the terminal.

Interactive on a terminal: replies stream as they are generated; ``/reset``
clears the history, ``/exit`` (or Ctrl-D) quits; Ctrl-C cancels the reply
being written, and a second Ctrl-C at the prompt quits. Not on a terminal:
``--prompt TEXT`` answers once; otherwise each stdin line is a message and
its reply is one stdout line (history kept across lines unless
``--no-history``; the same commands work; empty lines are ignored).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from trainformer.cli.common import add_engine_arg, add_model_verb
from trainformer.cli.generate import add_sampling_args, sampling_settings

HELP = "commands: /reset clears the history, /exit quits (or Ctrl-D); Ctrl-C cancels a reply"


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "chat", help="chat with a trained chat model",
        description="Chat with a model trained by the chat task. On a terminal: an interactive "
        "session with streamed replies. Otherwise one reply per stdin line (or --prompt). " + HELP,
        model_help="a model/ directory or a run directory of a chat model",
    )
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="a system line kept at the start of the conversation")
    p.add_argument("--no-history", action="store_true", help="answer each message on its own")
    add_engine_arg(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


class Repl:
    """The read-reply loop, independent of where lines come from (for tests, too).

    Args:
        bot: has ``reply(text, stream) -> str`` and ``reset()`` (a `Chatbot`).
        read: returns the next line, raises EOFError at the end (Ctrl-D) and
            KeyboardInterrupt on Ctrl-C.
        out: where replies go; interactive: prompts and streaming, else one line per reply.
    """

    def __init__(self, bot, read: Callable[[], str], out: TextIO, interactive: bool, keep_history: bool = True):
        self.bot, self.read, self.out = bot, read, out
        self.interactive, self.keep_history = interactive, keep_history

    def _say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> int:
        """Loop until /exit, end of input or a second Ctrl-C at the prompt; returns 0."""
        interrupted = False
        if self.interactive:
            self._say(HELP)
        while True:
            try:
                line = self.read()
            except EOFError:
                if self.interactive:
                    self._say()
                return 0
            except KeyboardInterrupt:
                if interrupted or not self.interactive:
                    self._say()
                    return 0
                interrupted = True
                self._say("\n(Ctrl-C again or Ctrl-D to exit)")
                continue
            interrupted = False
            if self.handle(line.strip()) == "exit":
                return 0

    def handle(self, text: str) -> str | None:
        """One input line: a command, nothing (empty), or a message to answer."""
        if not text:
            return None
        if text in ("/exit", "/quit"):
            return "exit"
        if text == "/reset":
            self.bot.reset()
            if self.interactive:
                self._say("(history cleared)")
            return None
        if text in ("/help", "/?"):
            self._say(HELP)
            return None
        self.answer(text)
        return None

    def answer(self, text: str) -> None:
        if self.interactive:
            self._say("bot> ", end="")
        try:
            reply = self.bot.reply(text, stream=self._stream if self.interactive else None)
        except KeyboardInterrupt:
            self._say(" [cancelled]")
            return
        self._say("" if self.interactive else " ".join(reply.splitlines()))  # one line per reply
        if not self.keep_history:
            self.bot.reset()

    def _stream(self, piece: str) -> None:
        self._say(piece, end="")


def _read_stdin() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _read_terminal() -> str:
    return input("you> ")


def _load(args, settings):
    """The chatbot of --engine: ours on a model dir, or CTranslate2's on its export."""
    from trainformer.interop import ct2

    if args.engine == "ctranslate2":
        return ct2.load_ct2_chatbot(args.model_dir, settings, args.system, args.device,
                                    compute_type=ct2.compute_type_of(args.precision))
    if ct2.is_ct2_dir(args.model_dir):
        from trainformer.errors import UserError

        raise UserError(f"{args.model_dir}: a CTranslate2 export; pass --engine ctranslate2")
    from trainformer.inference.loading import load_chatbot

    return load_chatbot(args.model_dir, settings, args.system, args.device, args.precision)


def run(args) -> int:
    settings = sampling_settings(args)
    bot = _load(args, settings)
    if args.prompt is not None:
        if not args.prompt.strip():
            from trainformer.errors import UserError

            raise UserError("--prompt: expected a non-empty message")
        print(bot.reply(args.prompt), flush=True)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    read = _read_terminal if interactive else _read_stdin
    return Repl(bot, read, sys.stdout, interactive, keep_history=not args.no_history).run()

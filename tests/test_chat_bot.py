"""The Chatbot (seeded sampling, history window, streaming) and the REPL loop (commands, Ctrl-C, Ctrl-D)."""

import io

import pytest
import torch

from trainformer.cli.chat import Repl
from trainformer.config import Config, ModelConfig, TokenizerConfig
from trainformer.data.chat_template import reserve_chat_tokens
from trainformer.data.tokenizer import train_tokenizer
from trainformer.errors import UserError
from trainformer.inference.chatbot import Chatbot
from trainformer.inference.sampling import SamplingSettings, StreamDecoder, TorchGenerator
from trainformer.models import build_model

TEXTS = ["Hello there, how are you?", "I'm fine, thanks! And you?", "Shall we go for a walk?",
         "Café crème ☕ naïve"] * 20


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(TEXTS, TokenizerConfig(kind="byte_bpe", vocab_size=300, min_frequency=1))
    reserve_chat_tokens(tok)
    cfg = Config(task="chat")
    cfg.model = ModelConfig(family="decoder", vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=1,
                            d_ff=64, max_len=64, dropout=0.0, init_std=0.5, tie_embeddings=False)
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), tok, cfg


def bot(parts, seed=0, max_new=12, **kw):
    model, tok, cfg = parts
    settings = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_new, seed=seed)
    return Chatbot(TorchGenerator(model, seed, precision="fp32"), tok, cfg.model.max_len, settings, **kw)


def test_same_seed_same_reply_other_seed_other_reply(parts):
    a = [bot(parts, seed=1).reply("Hello there") for _ in range(2)]
    assert a[0] == a[1] and a[0]
    others = {bot(parts, seed=s).reply("Hello there") for s in (2, 3, 4)}
    assert others - {a[0]}, "different seeds should (almost surely) give another reply"


def test_stream_pieces_make_the_reply(parts):
    pieces = []
    reply = bot(parts, seed=5).reply("Hello there", stream=pieces.append)
    assert "".join(pieces).strip() == reply
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(parts):
    _, tok, _ = parts
    ids = tok.encode("☕")
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in tok.encode("a☕b")]
    assert "".join(out) == "a☕b"
    if len(ids) > 1:  # the cup is split over byte tokens: nothing shown until it is whole
        assert "\ufffd" not in "".join(out[:2])


def test_history_keeps_system_and_newest_turns_in_window(parts):
    b = bot(parts, system="Be kind.", max_new=8)
    for i in range(10):
        b.reply(f"Shall we go for a walk number {i}?")
    ids, kept = b.prompt("And now?")
    assert len(ids) <= b.window - b.reserve
    assert b.dropped > 0  # old turns had to go
    assert ids[0] == b.template.role_id["system"]
    assert kept[-1].text == "And now?" and kept[0].role == "user"
    texts = [m.text for m in b.history]
    assert texts[-2] == "Shall we go for a walk number 9?"  # the newest exchange is intact


def test_reset_and_cancel_leave_history_clean(parts):
    b = bot(parts)
    b.reply("Hello there")
    assert len(b.history) == 2

    def cancel(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        b.reply("How are you?", stream=cancel)
    assert len(b.history) == 2  # a cancelled reply leaves no trace
    b.reset()
    assert b.history == []


def test_long_message_is_truncated_with_warning(parts, capsys):
    b = bot(parts, max_new=8)
    reply = b.reply("Hello there, how are you? " * 40)
    assert isinstance(reply, str)
    assert "fit the model's window" in capsys.readouterr().err
    assert len(b.prompt("ok")[0]) <= b.window - b.reserve


def test_bad_settings_are_user_errors(parts):
    with pytest.raises(UserError, match="--top-p"):
        SamplingSettings(top_p=0.0).check()
    with pytest.raises(UserError, match="--temperature"):
        SamplingSettings(temperature=-1).check()
    with pytest.raises(UserError, match="--system"):
        bot(parts, max_new=20, system="Hello there " * 40).reply("hi")


# ---------------------------------------------------------------------------- the REPL loop


class FakeBot:
    def __init__(self):
        self.heard, self.resets = [], 0

    def reply(self, text, stream=None):
        if text == "slow":
            if stream:
                stream("par")
            raise KeyboardInterrupt
        self.heard.append(text)
        if text == "two lines":
            return "first\nsecond"
        if stream:
            stream("re: ")
            stream(text)
        return f"re: {text}"

    def reset(self):
        self.resets += 1


def reader(items):
    """read() that returns lines, raises exceptions given as instances, then EOFError."""
    items = list(items)

    def read():
        if not items:
            raise EOFError
        item = items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_repl_commands_and_empty_lines():
    b, out = FakeBot(), io.StringIO()
    rc = Repl(b, reader(["hello", "", "   ", "/reset", "again", "/exit", "never"]), out, interactive=False).run()
    assert rc == 0 and b.heard == ["hello", "again"] and b.resets == 1
    assert out.getvalue() == "re: hello\nre: again\n"


def test_repl_pipe_mode_prints_one_line_per_reply():
    out = io.StringIO()
    Repl(FakeBot(), reader(["two lines", "x"]), out, interactive=False).run()
    assert out.getvalue() == "first second\nre: x\n"


def test_repl_no_history_resets_after_each_reply():
    b = FakeBot()
    Repl(b, reader(["a", "b"]), io.StringIO(), interactive=False, keep_history=False).run()
    assert b.resets == 2


def test_repl_ctrl_c_cancels_reply_then_continues():
    b, out = FakeBot(), io.StringIO()
    rc = Repl(b, reader(["slow", "next"]), out, interactive=True).run()
    assert rc == 0 and b.heard == ["next"]
    text = out.getvalue()
    assert "bot> par [cancelled]" in text and "bot> re: next" in text


def test_repl_ctrl_c_twice_at_prompt_exits_once_does_not():
    b, out = FakeBot(), io.StringIO()
    assert Repl(b, reader([KeyboardInterrupt(), "hi", KeyboardInterrupt(), KeyboardInterrupt(), "never"]),
                out, interactive=True).run() == 0
    assert b.heard == ["hi"] and "Ctrl-C again" in out.getvalue()


def test_repl_ctrl_d_exits_cleanly():
    b = FakeBot()
    assert Repl(b, reader(["hi"]), io.StringIO(), interactive=True).run() == 0
    assert b.heard == ["hi"]

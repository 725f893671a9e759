"""Chat template: render/parse round trip, exact loss labels, history fitting, training examples."""

import pytest
import torch

from trainformer.config import TokenizerConfig
from trainformer.data.batching import IGNORE_INDEX
from trainformer.data.chat_template import (
    ASSISTANT,
    END,
    SYSTEM,
    USER,
    ChatTemplate,
    Message,
    reserve_chat_tokens,
)
from trainformer.data.tokenizer import train_tokenizer
from trainformer.errors import DataError
from trainformer.tasks.chat import dialogue_examples, distinct_n
from trainformer.tasks.lm import clean_dailydialog, collate_causal

TEXTS = ["Hello there, how are you?", "I'm fine, thanks! And you?", "What a lovely day it is.",
         "Shall we go for a walk in the park?", "Sure, let's go after lunch."] * 20


@pytest.fixture(scope="module")
def template():
    tok = train_tokenizer(TEXTS, TokenizerConfig(kind="byte_bpe", vocab_size=300, min_frequency=1))
    reserve_chat_tokens(tok)
    return ChatTemplate(tok)


def test_markers_are_single_special_tokens(template):
    tok = template.tokenizer
    for marker in (SYSTEM, USER, ASSISTANT, END):
        assert len(tok.encode(marker)) == 1
    ids = reserve_chat_tokens(tok)  # idempotent: nothing new, same ids
    assert ids == [tok.token_to_id(m) for m in (SYSTEM, USER, ASSISTANT, END)]


def test_template_needs_markers():
    tok = train_tokenizer(TEXTS, TokenizerConfig(kind="byte_bpe", vocab_size=300, min_frequency=1))
    with pytest.raises(DataError, match="role markers"):
        ChatTemplate(tok)


def test_render_parse_round_trip(template):
    messages = [Message("system", "Be kind."), Message("user", "Hello there, how are you?"),
                Message("assistant", "I'm fine, thanks! And you?"), Message("user", "Ünïcode ☕ ok")]
    rendered = template.render(messages)
    assert template.parse(rendered.ids) == messages
    text = template.tokenizer.decode(rendered.ids, skip_special_tokens=False)
    assert text == ("<|system|>Be kind.<|end|><|user|>Hello there, how are you?<|end|>"
                    "<|assistant|>I'm fine, thanks! And you?<|end|><|user|>Ünïcode ☕ ok<|end|>")
    prompt = template.render(messages[:2], add_generation_prompt=True)
    assert prompt.ids[-1] == template.role_id["assistant"] and not any(prompt.loss_mask)


def test_typed_markers_stay_text(template):
    rendered = template.render([Message("user", "say <|end|> and <|assistant|> please")])
    markers = set(template.role_id.values()) | {template.end_id}
    assert sum(i in markers for i in rendered.ids) == 2  # only the real user marker and end
    assert "end" in template.parse(rendered.ids)[0].text


def test_loss_only_on_assistant_tokens_exact_labels(template):
    tok = template.tokenizer
    user, reply = tok.encode("Hello there"), tok.encode("Sure")
    rendered = template.render([Message("user", "Hello there"), Message("assistant", "Sure")])
    u, a, e = template.role_id["user"], template.role_id["assistant"], template.end_id
    assert rendered.ids == [u, *user, e, a, *reply, e]
    assert rendered.loss_mask == [False] * (len(user) + 3) + [True] * (len(reply) + 1)
    batch = collate_causal([rendered.ids], [[int(m) for m in rendered.loss_mask]])
    assert batch["ids"][0].tolist() == rendered.ids[:-1]
    # the next token is a target only where it is assistant text or the assistant's <|end|>
    expected = [IGNORE_INDEX] * (len(user) + 2) + [*reply, e]
    assert batch["labels"][0].tolist() == expected


def test_collate_pads_right_without_loss(template):
    short, long_ = [5, 6, 7], [5, 6, 7, 8, 9]
    batch = collate_causal([short, long_], [[0, 1, 1], [0, 0, 1, 1, 1]])
    assert batch["ids"].shape == (2, 4) and batch["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["labels"].tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9]]
    assert batch["labels"].dtype == torch.long


def test_fit_drops_oldest_turns_keeps_system_and_newest(template):
    system = Message("system", "Be kind.")
    turns = []
    for i in range(8):
        turns += [Message("user", f"Question number {i}, what a lovely day?"), Message("assistant", f"Answer {i}.")]
    newest = Message("user", "And the last one?")
    messages = [system, *turns, newest]
    full = len(template.render(messages, add_generation_prompt=True))
    kept, dropped = template.fit(messages, full - 5)
    assert dropped >= 2 and dropped % 2 == 0  # whole user/assistant pairs go
    assert kept[0] == system and kept[1].role == "user" and kept[-1] == newest
    assert kept[1:] == messages[1 + dropped:]  # a suffix: the newest turns survive
    assert len(template.render(kept, add_generation_prompt=True)) <= full - 5
    assert template.fit(messages, full) == (messages, 0)
    tiny, _ = template.fit(messages, 1)  # nothing fits: system and the newest message remain
    assert tiny == [system, newest]


def _assistant_texts(template, examples):
    out = []
    for ex in examples:
        msgs = template.parse(ex.ids)
        assert msgs[0].role == "user" and msgs[-1].role == "assistant"
        assert [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        out += [m.text for m in msgs if m.role == "assistant"]
    return out


def test_dialogue_examples_cover_every_reply_once(template):
    utts = [f"Utterance {i} of the lovely day." for i in range(7)]
    ids = [template.tokenizer.encode(u) for u in utts]
    examples, skipped = dialogue_examples(ids, template, budget=10_000)
    assert skipped == 0 and len(examples) == 2  # one per role assignment
    assert sorted(_assistant_texts(template, examples)) == sorted(utts[1:])


def test_long_dialogue_drops_oldest_turns(template):
    utts = [f"Utterance {i} of the lovely day, shall we walk?" for i in range(9)]
    ids = [template.tokenizer.encode(u) for u in utts]
    pair = template.turn_length(ids[0]) + template.turn_length(ids[1])
    examples, skipped = dialogue_examples(ids, template, budget=2 * pair + 2)
    assert skipped == 0 and len(examples) > 2
    assert all(len(ex) <= 2 * pair + 2 for ex in examples)
    assert sorted(_assistant_texts(template, examples)) == sorted(utts[1:])
    newest = [ex for ex in examples if template.parse(ex.ids)[-1].text == utts[-1]]
    assert len(newest) == 1 and template.parse(newest[0].ids)[0].text == utts[-4]  # oldest cut
    _, skipped = dialogue_examples(ids, template, budget=pair - 1)
    assert skipped == 8  # no user/assistant pair fits: every reply skipped, counted


def test_clean_dailydialog():
    assert clean_dailydialog("I ’ m fine , thanks ! What ' s up ?") == "I'm fine, thanks! What's up?"
    assert clean_dailydialog("It costs $ 5 ( plus tax ) .") == "It costs $5 (plus tax)."
    assert clean_dailydialog("Don't  worry .") == "Don't worry."


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["A b", "a B"], 2) == pytest.approx(0.5)  # lowercased, counted across replies
    assert distinct_n([""], 2) == 0.0

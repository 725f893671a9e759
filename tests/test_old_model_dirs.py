"""Model dirs written by an older version (0e2a4e6) still load, and still compute what they did.

`tests/fixtures/model-dirs-0e2a4e6/` holds tiny model dirs that trainformer
0e2a4e6 wrote with its own verbs (train, prune, quantize), and the outputs
that version gave on fixed inputs: logits, translations, entities, relations,
chat replies and the text of the `translate`, `extract` and `chat` verbs
(`tests/fixtures/make_old_model_dirs.py` made them and says how to remake
them). Here today's code reads the same files. A failure means a model/
directory that users already have no longer loads, or answers differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainformer.cli import main
from trainformer.inference.loading import (
    load_chatbot,
    load_classifier,
    load_tagger,
    load_translator,
)
from trainformer.inference.sampling import SamplingSettings
from trainformer.modeldir import load_model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "model-dirs-0e2a4e6"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
LOGITS = load_file(str(FIXTURES / "expected-logits.safetensors"))
DIRS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
RUNTIME = ["--device", "cpu", "--precision", "fp32"]


def test_the_fixture_holds_every_kind_of_model_dir():
    assert DIRS == ["chat", "ner", "ner-prior", "relations", "translation", "translation-pruned",
                    "translation-pruned-int8"]
    assert (FIXTURES / "ner-prior" / "transitions.json").is_file()


def recorded_inputs(name: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in LOGITS.items() if k.split(".", 1)[0] == name and not k.endswith(".logits")}


@pytest.mark.parametrize("name", DIRS)
def test_old_dir_loads_and_gives_the_recorded_logits(name):
    loaded = load_model_dir(FIXTURES / name, "cpu")
    inputs = recorded_inputs(name)
    with torch.no_grad():
        if loaded.cfg.model.family == "encoder_decoder":
            logits = loaded.model(inputs["src"], inputs["tgt"], inputs["src_mask"])
        else:
            logits = loaded.model(**inputs)
    torch.testing.assert_close(logits, LOGITS[f"{name}.logits"], atol=1e-5, rtol=0)


def test_pruned_shapes_of_0e2a4e6_come_from_compression_json():
    """At 0e2a4e6 `prune` wrote the per-layer sizes to compression.json only; they must still be used."""
    for name in ("translation-pruned", "translation-pruned-int8"):
        config = json.loads((FIXTURES / name / "config.json").read_text(encoding="utf-8"))
        assert "layer_sizes" not in config["model"]
        pruned = json.loads((FIXTURES / name / "compression.json").read_text(encoding="utf-8"))["pruned"]
        assert load_model_dir(FIXTURES / name, "cpu").cfg.model.layer_sizes == pruned
    assert len(set(pruned.values())) > 1  # the layers were cut differently: per-layer sizes matter


def run_verb(tmp_path, verb: str, name: str, lines: list[str], *extra: str) -> str:
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    assert main([verb, str(FIXTURES / name), "--input", str(src), "--output", str(out), *RUNTIME, *extra]) == 0
    return out.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["translation", "translation-pruned", "translation-pruned-int8"])
def test_old_translation_dirs_translate_as_before(name, tmp_path):
    want = EXPECTED[name]
    translator = load_translator(FIXTURES / name, "cpu", "fp32")
    assert [n[0] for n in translator.translate(want["sources"], beam=1)] == want["greedy"]
    assert translator.translate(want["sources"], beam=2, nbest=2) == want["beam2"]
    assert run_verb(tmp_path, "translate", name, want["sources"], "--beam", "1") == want["cli_translate"]


@pytest.mark.parametrize("name", ["ner", "ner-prior"])
def test_old_ner_dirs_tag_as_before(name, tmp_path):
    want = EXPECTED[name]
    tagger = load_tagger(FIXTURES / name, "cpu", "fp32")
    assert tagger.tag([line.split() for line in want["lines"]]) == want["tags"]
    assert tagger.extract(want["lines"]) == want["extract"]
    assert run_verb(tmp_path, "extract", name, want["lines"]) == want["cli_extract"]


def test_old_relation_dir_classifies_as_before(tmp_path):
    want = EXPECTED["relations"]
    classifier = load_classifier(FIXTURES / "relations", "cpu", "fp32")
    got = classifier.predict([line for line in want["lines"] if line])
    assert [label for label, _ in got] == [label for label, _ in want["predict"]]
    assert [score for _, score in got] == pytest.approx([score for _, score in want["predict"]], abs=1e-5)
    assert classifier.extract(want["lines"]) == want["extract"]
    assert run_verb(tmp_path, "extract", "relations", want["lines"]) == want["cli_extract"]


def test_old_chat_dir_replies_as_before(capsys):
    want = EXPECTED["chat"]
    for kind, settings in (("greedy", SamplingSettings(temperature=0.0, max_new_tokens=12)),
                           ("sampled", SamplingSettings(max_new_tokens=12, seed=3))):
        bot = load_chatbot(FIXTURES / "chat", settings, device="cpu", precision="fp32")
        assert [bot.reply(p) for p in want["prompts"]] == want[kind], kind
    capsys.readouterr()
    assert main(["chat", str(FIXTURES / "chat"), "--prompt", want["prompts"][0], "--temperature", "0",
                 "--max-new-tokens", "12", *RUNTIME]) == 0
    assert capsys.readouterr().out == want["cli_chat"]

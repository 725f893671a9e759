"""Export to and import from Hugging Face transformers, proven by parity.

Every exportable family is checked the same way: our logits against the
transformers class's logits on a padded batch (fp32, <= 1e-4), our tokenizer's
ids against `AutoTokenizer`'s, and a round trip HF -> ours -> HF that gives
bitwise-equal tensors. A tiny translation model trained here decodes the same
200 sentences identically with `Translator` and with HF `generate`, greedy and
beam 4.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from test_translation_e2e import make_pairs  # noqa: E402
from trainformer.cli import main  # noqa: E402
from trainformer.config import TokenizerConfig, from_dict  # noqa: E402
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer, train_tokenizer  # noqa: E402
from trainformer.errors import UserError  # noqa: E402
from trainformer.interop.hf import choose_layout, export_hf  # noqa: E402
from trainformer.interop.hf_import import import_hf_dir  # noqa: E402
from trainformer.modeldir import load_model_dir, save_model_dir  # noqa: E402
from trainformer.models import build_model  # noqa: E402

TEXTS = ["the red cat sleeps on the big house .", "Where is the station ?", "a small dog , a blue car !"]


def make_dir(root, task: str, model: dict, kind: str = "bpe", labels=None, chat: bool = False):
    """A model dir of `task` with random (but not initial) weights and a tokenizer of `kind`."""
    texts = [t for p in make_pairs(200) for t in p] + TEXTS
    tok = train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=120, min_frequency=1))
    if chat:
        from trainformer.data.chat_template import reserve_chat_tokens

        reserve_chat_tokens(tok)
    cfg = from_dict({"task": task, "name": f"tiny-{task}", "model": dict(model, vocab_size=tok.vocab_size),
                     "train": {"precision": "fp32", "device": "cpu"}})
    torch.manual_seed(0)
    m = build_model(cfg.model)
    with torch.no_grad():  # move every tensor off its initial value (zero biases, unit norms)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = save_model_dir(m, cfg, root / "model")
    tok.save(out / "tokenizer.json")
    if labels:
        (out / "labels.json").write_text(json.dumps(labels))
    return out


def export(model_dir, root):
    out = root / "hf"
    out.mkdir()
    export_hf(load_model_dir(model_dir), out)
    return out


def padded_batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    return ids.masked_fill(~mask, PAD_ID), mask


def assert_close_on_real(ours, theirs, mask):
    diff = (ours.float() - theirs.float()).abs()[mask]  # padding positions hold no meaning
    assert diff.max().item() <= 1e-4, diff.max().item()


FAMILIES = {
    "pegasus": ("translation", dict(preset="tiny-encdec", n_heads=4, n_layers=2, dropout=0.0), "bpe"),
    "marian": ("translation", dict(preset="tiny-encdec", n_heads=4, n_layers=2, n_decoder_layers=1,
                                   norm_first=False, activation="relu", dropout=0.0), "bpe"),
    "gpt2": ("lm", dict(preset="tiny-decoder", scale_embedding=False, dropout=0.0), "byte_bpe"),
    "xlmr-mlm": ("mlm", dict(preset="tiny-encoder", head="mlm", dropout=0.0), "wordpiece"),
    "xlmr-mlm-unscaled": ("mlm", dict(preset="tiny-encoder", head="mlm", scale_embedding=False, dropout=0.0),
                          "wordpiece"),
    "xlmr-tagging": ("ner", dict(preset="tiny-encoder", head="tagging", num_labels=3, crf=True, dropout=0.0),
                     "wordpiece"),
    "bert-mlm": ("mlm", dict(preset="tiny-encoder", head="mlm", norm_first=False, embed_norm=True, dropout=0.0),
                 "wordpiece"),
    "bert-tagging": ("ner", dict(preset="tiny-encoder", head="tagging", num_labels=3, norm_first=False,
                                 embed_norm=True, scale_embedding=False, norm_eps=1e-12, dropout=0.0), "wordpiece"),
}
LABELS = ["O", "B-PER", "I-PER"]
STEPS = 80  # half-trained: beam 4 then differs from greedy on about a third of the sentences


def _logits(model, family: str, ids, mask):
    """Ours and the HF model's logits on the same padded batch."""
    if family in ("pegasus", "marian"):
        tgt = torch.cat([torch.full((3, 1), BOS_ID), ids[:, 1:6]], dim=1)
        return model(ids, tgt, mask), dict(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=tgt)
    if family == "gpt2":
        return model(ids, mask), dict(input_ids=ids, attention_mask=mask.long())
    return model(ids, mask), dict(input_ids=ids, attention_mask=mask.long())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_logits_equal_ours_on_a_padded_batch(family, tmp_path):
    task, model_cfg, kind = FAMILIES[family]
    model_dir = make_dir(tmp_path, task, model_cfg, kind, labels=LABELS if task == "ner" else None)
    hf_dir = export(model_dir, tmp_path)
    ours = load_model_dir(model_dir)
    auto = getattr(transformers, choose_layout(ours.cfg).auto_class)
    hf = auto.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == choose_layout(ours.cfg).arch
    ids, mask = padded_batch(ours.cfg.model.vocab_size)
    with torch.no_grad():
        our_logits, hf_inputs = _logits(ours.model, family, ids, mask)
        their_logits = hf(**hf_inputs).logits
    real = mask if family not in ("pegasus", "marian") else torch.ones(3, 6, dtype=torch.bool)
    assert_close_on_real(our_logits, their_logits, real)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (hf_dir / name).is_file(), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_hf_ours_hf_is_bitwise(family, tmp_path):
    task, model_cfg, kind = FAMILIES[family]
    model_dir = make_dir(tmp_path, task, model_cfg, kind, labels=LABELS if task == "ner" else None)
    first = export(model_dir, tmp_path)
    imported = import_hf_dir(first, tmp_path / "imported")
    second = tmp_path / "hf2"
    second.mkdir()
    export_hf(load_model_dir(imported), second)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if task == "ner":
        assert json.loads((imported / "labels.json").read_text()) == LABELS


def test_hf_tokenizer_gives_our_ids(tmp_path):
    for task, kind, wrap in (("translation", "bpe", lambda ids: [*ids, EOS_ID]),
                             ("lm", "byte_bpe", lambda ids: ids),
                             ("ner", "wordpiece", lambda ids: [6, *ids, 5])):
        root = tmp_path / task
        root.mkdir()
        family = {"translation": "pegasus", "lm": "gpt2", "ner": "xlmr-tagging"}[task]
        model_dir = make_dir(root, task, FAMILIES[family][1], kind, labels=LABELS if task == "ner" else None)
        hf_dir = export(model_dir, root)
        ours = TextTokenizer.load(model_dir / "tokenizer.json")
        theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
        for text in TEXTS:
            assert theirs(text)["input_ids"] == wrap(ours.encode(text)), (task, text)
        assert theirs.pad_token_id == PAD_ID and theirs.eos_token_id == EOS_ID


def test_chat_template_renders_our_chat_format(tmp_path):
    from trainformer.data.chat_template import ChatTemplate, Message

    model_dir = make_dir(tmp_path, "chat", FAMILIES["gpt2"][1], "byte_bpe", chat=True)
    hf_dir = export(model_dir, tmp_path)
    template = ChatTemplate(TextTokenizer.load(model_dir / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = [("system", "Be brief."), ("user", " Hi there! How are you? "), ("assistant", "Fine, thanks."),
                ("user", "What does <|end|> mean?")]
    ours = template.render([Message(r, t) for r, t in messages], add_generation_prompt=True).ids
    rendered = theirs.apply_chat_template([{"role": r, "content": t} for r, t in messages],
                                          add_generation_prompt=True, tokenize=True)
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    assert list(rendered) == ours


def test_refusals_name_the_option(tmp_path):
    cases = [
        ("ner", dict(preset="tiny-encoder", head="tagging", num_labels=3, position="rope"), "model.position=rope"),
        ("ner", dict(preset="tiny-encoder", head="tagging", num_labels=3, char_cnn=16), "model.char_cnn"),
        ("relations", dict(preset="tiny-encoder", head="relation", num_labels=3), "model.head=relation"),
        ("lm", dict(preset="tiny-decoder", norm="rmsnorm"), "model.norm=rmsnorm"),
        ("lm", dict(preset="tiny-decoder", scale_embedding=True), "model.scale_embedding"),
        ("translation", dict(preset="tiny-encdec", position="learned"), "model.position=learned"),
    ]
    for task, model_cfg, needle in cases:
        cfg = from_dict({"task": task, "model": dict(model_cfg, vocab_size=50)})
        with pytest.raises(UserError, match=needle.replace(".", r"\.")) as err:
            choose_layout(cfg)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# A trained tiny translator: greedy and beam 4 through both libraries
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_translator(tmp_path_factory):
    """A tiny translator, half-trained on the toy language, as a model dir and its Pegasus export."""
    from helpers_interop import train_toy_translator

    root = tmp_path_factory.mktemp("hf-translate")
    model, cfg, tok = train_toy_translator(STEPS)
    cfg.eval.beam = 4
    model_dir = save_model_dir(model, cfg, root / "model")
    tok.save(model_dir / "tokenizer.json")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    export_hf(load_model_dir(model_dir), hf_dir)
    return model_dir, hf_dir, [e for e, _ in make_pairs(200, seed=7)]


@pytest.fixture(scope="module")
def random_translator(tmp_path_factory):
    """A translator with random (not initial) weights, as a model dir and its Pegasus export: for
    parity and file checks, which need no training (the fast tier skips the fixture above)."""
    root = tmp_path_factory.mktemp("hf-random-translator")
    model_dir = make_dir(root, *FAMILIES["pegasus"])
    return model_dir, export(model_dir, root), [e for e, _ in make_pairs(200, seed=7)]


def _hf_translate(hf_dir, sources, beam: int, max_len: int) -> list[str]:
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
    out = []
    for i in range(0, len(sources), 25):
        enc = tok(sources[i:i + 25], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, num_beams=beam, do_sample=False, max_new_tokens=max_len,
                                 length_penalty=0.0, early_stopping=True)
        out += tok.batch_decode(gen, skip_special_tokens=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 4])
def test_translations_identical_to_hf_generate(trained_translator, beam):
    from trainformer.inference.loading import load_translator

    model_dir, hf_dir, sources = trained_translator
    translator = load_translator(model_dir, "cpu", "fp32")
    translator.cfg.eval.length_penalty = 0.0  # HF and we normalise by length differently; compare raw scores
    ours = [h[0] for h in translator.translate(sources, beam=beam, max_len=24)] if beam == 1 else None
    if beam > 1:
        from trainformer.generation import beam_translate

        ours = []
        for i in range(0, len(sources), 25):
            src, src_mask = translator._pad(translator._encode(sources[i:i + 25]))
            hyps = beam_translate(translator.model, src, src_mask, BOS_ID, EOS_ID, beam=beam, length_penalty=0.0,
                                  max_len=24)
            ours += [translator.tokenizer.decode(h[0][0]) for h in hyps]
    theirs = _hf_translate(hf_dir, sources, beam, 24)
    assert ours == theirs
    if beam > 1:  # the beam really searched: it often disagrees with greedy
        greedy = [h[0] for h in translator.translate(sources, beam=1, max_len=24)]
        assert sum(b != g for b, g in zip(ours, greedy)) >= 20


@pytest.mark.slow
def test_pipeline_runs_on_each_exported_family(trained_translator, tmp_path):
    _, hf_dir, _ = trained_translator
    from transformers.pipelines import SUPPORTED_TASKS

    if "translation" in SUPPORTED_TASKS:  # transformers 5 removed the seq2seq pipelines: generate() above
        translate = transformers.pipeline("translation", model=str(hf_dir))
        assert translate("the red cat .")[0]["translation_text"].strip()
    (tmp_path / "lm").mkdir()
    lm_dir = export(make_dir(tmp_path / "lm", "lm", FAMILIES["gpt2"][1], "byte_bpe"), tmp_path / "lm")
    generate = transformers.pipeline("text-generation", model=str(lm_dir))
    assert isinstance(generate("the red", max_new_tokens=5, do_sample=False)[0]["generated_text"], str)
    (tmp_path / "ner").mkdir()
    ner_dir = export(make_dir(tmp_path / "ner", "ner", FAMILIES["xlmr-tagging"][1], "wordpiece", labels=LABELS),
                     tmp_path / "ner")
    tag = transformers.pipeline("token-classification", model=str(ner_dir))
    assert all(e["entity"] in LABELS for e in tag("the red cat sleeps"))
    (tmp_path / "mlm").mkdir()
    mlm_dir = export(make_dir(tmp_path / "mlm", "mlm", FAMILIES["xlmr-mlm"][1], "wordpiece"), tmp_path / "mlm")
    fill = transformers.pipeline("fill-mask", model=str(mlm_dir))
    assert len(fill("the red <mask> sleeps")) == 5


def test_our_verbs_and_init_from_read_an_hf_dir(random_translator, tmp_path, capsys):
    """`translate` on the exported dir itself, and `init_from` of an HF dir loads every tensor."""
    from trainformer.training.checkpoint import load_pretrained

    model_dir, hf_dir, sources = random_translator
    assert main(["translate", str(hf_dir), "--beam", "1", "--device", "cpu", "--precision", "fp32",
                 "--input", str(_write(tmp_path / "in.txt", sources[:40]))]) == 0
    via_hf = capsys.readouterr().out.splitlines()
    assert sum(bool(line.strip()) for line in via_hf) >= 10  # random weights: not every reply is empty
    assert main(["translate", str(model_dir), "--beam", "1", "--device", "cpu", "--precision", "fp32",
                 "--input", str(tmp_path / "in.txt")]) == 0
    assert capsys.readouterr().out.splitlines() == via_hf
    fresh = build_model(load_model_dir(model_dir).cfg.model)
    missing, skipped = load_pretrained(fresh, hf_dir)
    assert not missing and not skipped


def test_first_step_loss_from_hf_dir_equals_hf_loss(tmp_path):
    """A fine-tune started from an HF GPT-2 dir sees the same loss on its first batch as HF computes."""
    from trainformer.training.checkpoint import load_pretrained

    model_dir = make_dir(tmp_path, "lm", FAMILIES["gpt2"][1], "byte_bpe")
    hf_dir = export(model_dir, tmp_path)
    cfg = load_model_dir(hf_dir).cfg  # through the import
    ours = build_model(cfg.model)
    load_pretrained(ours, hf_dir)
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids, _ = padded_batch(cfg.model.vocab_size)
    ids = ids[:1]
    with torch.no_grad():
        logits = ours(ids[:, :-1])
        our_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        hf_loss = hf(input_ids=ids, labels=ids).loss
    assert abs(our_loss.item() - hf_loss.item()) < 1e-5


def test_export_cli_is_atomic_and_refuses_without_force(random_translator, tmp_path, capsys):
    model_dir, _, _ = random_translator
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(model_dir), "--to", "hf", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main(["export", str(model_dir), "--to", "hf", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "tmp-export" in p.name or "old-export" in p.name]


def test_export_cli_one_line_errors_leave_nothing(tmp_path, capsys):
    relation_dir = make_dir(tmp_path, "relations", dict(preset="tiny-encoder", head="relation", num_labels=3),
                            "wordpiece", labels=LABELS)
    out = tmp_path / "out"
    assert main(["export", str(relation_dir), "--to", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.head=relation" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["export", str(tmp_path / "nope"), "--to", "hf", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text('{"model_type": "bart", "architectures": ["BartModel"]}')
    assert main(["export", str(tmp_path / "notmodel"), "--to", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "BartModel" in err and "imports" in err


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# A checkpoint trained elsewhere: GPT-2 layout, its own vocabulary and activation
# ---------------------------------------------------------------------------


def foreign_gpt2(root):
    """A GPT-2 dir as transformers writes one: byte-level BPE with <|endoftext|> last, gelu_new."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t for p in make_pairs(300) for t in p] + TEXTS, vocab_size=400, min_frequency=1)
    bpe.add_special_tokens(["<|endoftext|>"])
    eot = bpe.token_to_id("<|endoftext|>")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=48, n_layer=2, n_head=2,
                                  activation_function="gelu_new", bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = root / "gpt2"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def test_foreign_gpt2_imports_with_its_vocabulary_renumbered(tmp_path):
    from trainformer.data.tokenizer import SPECIAL_TOKENS
    from trainformer.interop.hf_vocab import plan, special_roles

    hf_dir, hf, hf_tok = foreign_gpt2(tmp_path)
    loaded = load_model_dir(hf_dir)
    assert loaded.cfg.model.activation == "gelu_tanh" and loaded.cfg.task == "lm"
    ours_tok = TextTokenizer.load(loaded.tokenizer_path)
    assert [ours_tok.id_to_token(i) for i in range(7)] == list(SPECIAL_TOKENS)
    vm = plan(json.loads((hf_dir / "tokenizer.json").read_text()), special_roles(hf_dir))
    assert vm.old_of_new[EOS_ID] == hf_tok.eos_token_id  # <|endoftext|> became our </s>
    assert sum(o is None for o in vm.old_of_new) == 6  # the other six roles are new tokens
    for text in TEXTS:
        ours_ids = ours_tok.encode(text)
        assert [vm.old_of_new[i] for i in ours_ids] == hf_tok(text)["input_ids"]
    text = TEXTS[0]
    ours_ids = torch.tensor([[EOS_ID, *ours_tok.encode(text)]])
    hf_ids = torch.tensor([[hf_tok.eos_token_id, *hf_tok(text)["input_ids"]]])
    with torch.no_grad():
        ours, theirs = loaded.model(ours_ids), hf(input_ids=hf_ids).logits
    old = torch.tensor([o for o in vm.old_of_new if o is not None])
    new = torch.tensor([i for i, o in enumerate(vm.old_of_new) if o is not None])
    assert (ours[..., new] - theirs[..., old]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_chat_fine_tunes_from_a_foreign_gpt2_dir(tmp_path, monkeypatch):
    """`trainformer train chat-... --set init_from=path/to/gpt2`: the pretrained rows are kept, markers added."""
    from test_chat_e2e import tiny_config, write_dailydialog
    from trainformer.rundir import RunDir
    from trainformer.tasks import build_task
    from trainformer.training.trainer import Trainer

    hf_dir, hf, _ = foreign_gpt2(tmp_path)
    write_dailydialog(tmp_path / "data")
    monkeypatch.setenv("TRAINFORMER_DATA", str(tmp_path / "data"))
    cfg = tiny_config("chat", 4, init_from=str(hf_dir))
    Trainer(cfg, build_task(cfg), RunDir(tmp_path / "chat")).fit()
    tuned = load_model_dir(tmp_path / "chat" / "model")
    assert tuned.cfg.model.d_model == 48 and tuned.cfg.model.activation == "gelu_tanh"
    assert tuned.cfg.model.vocab_size == hf.config.vocab_size + 6 + 4  # + our specials + the role markers
    assert (tmp_path / "chat" / "summary.json").is_file()


def foreign_bert(root):
    """A bare BertModel dir with BERT's own WordPiece specials ([PAD] 0, [UNK], [CLS], [SEP], [MASK])."""
    from tokenizers import BertWordPieceTokenizer

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator([t for p in make_pairs(300) for t in p] + TEXTS, vocab_size=200, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    cfg = transformers.BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  type_vocab_size=2)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # a non-zero segment-0 row, which import folds into the positions
        model.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    out = root / "bert"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def test_foreign_bert_imports_and_starts_a_tagger(tmp_path):
    from trainformer.interop.hf_vocab import plan, special_roles
    from trainformer.training.checkpoint import load_pretrained

    hf_dir, hf, hf_tok = foreign_bert(tmp_path)
    loaded = load_model_dir(hf_dir)
    m = loaded.cfg.model
    assert (m.family, m.head, m.norm_first, m.embed_norm) == ("encoder", "mlm", False, True)
    vm = plan(json.loads((hf_dir / "tokenizer.json").read_text()), special_roles(hf_dir))
    ours_tok = TextTokenizer.load(loaded.tokenizer_path)
    text = TEXTS[0]
    ours_ids = torch.tensor([[6, *ours_tok.encode(text), 5]])  # <cls> ... <sep>
    body = hf_tok(text, add_special_tokens=False)["input_ids"]
    hf_ids = torch.tensor([[hf_tok.cls_token_id, *body, hf_tok.sep_token_id]])
    assert [vm.old_of_new[i] for i in ours_ids[0].tolist()] == hf_ids[0].tolist()
    with torch.no_grad():
        ours = loaded.model.hidden(ours_ids)
        theirs = hf(input_ids=hf_ids).last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-4
    from trainformer.tasks.extraction import inherit_pretrained

    tagger_cfg = from_dict({"task": "ner", "init_from": str(hf_dir),
                            "model": {"preset": "medium-encoder", "head": "tagging", "num_labels": 5}})
    inherit_pretrained(tagger_cfg)  # what the ner task does with init_from: BERT's shape and tokenizer
    assert (tagger_cfg.model.d_model, tagger_cfg.model.embed_norm, tagger_cfg.model.norm_first) == (32, True, False)
    assert TextTokenizer.load(tagger_cfg.data.tokenizer.path).token_to_id("<cls>") == 6
    tagger = build_model(tagger_cfg.model)
    missing, _ = load_pretrained(tagger, hf_dir)
    assert missing == ["head.proj.bias", "head.proj.weight"]  # everything else came from BERT


def test_corrupt_weights_are_one_line_errors(tmp_path, capsys):
    model_dir = make_dir(tmp_path, "lm", FAMILIES["gpt2"][1], "byte_bpe")
    hf_dir = export(model_dir, tmp_path)
    capsys.readouterr()
    for broken in (model_dir, hf_dir):
        (broken / "model.safetensors").write_bytes(b"not safetensors at all")
        assert main(["export", str(broken), "--to", "hf", "--out", str(tmp_path / f"out-{broken.name}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not a readable safetensors file" in err


def test_generation_config_follows_the_models_beam(tmp_path):
    """A greedy model (eval.beam 1) gets a valid generation config without beam settings."""
    model_dir = make_dir(tmp_path, "translation", FAMILIES["pegasus"][1], "bpe")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eval"]["beam"] = 1
    (model_dir / "config.json").write_text(json.dumps(cfg))
    gen = transformers.GenerationConfig.from_pretrained(export(model_dir, tmp_path))
    assert gen.num_beams in (None, 1) and gen.decoder_start_token_id == BOS_ID and gen.forced_eos_token_id is None


def test_model_card_tells_task_data_scores_and_what_is_not_carried(tmp_path):
    """RUN/model exported: the card names the data and its licence, the run's scores, the CRF left behind."""
    model_dir = make_dir(tmp_path, "ner", FAMILIES["xlmr-tagging"][1], "wordpiece", labels=LABELS)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["data"]["dataset"] = "conll2003"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"steps": 1046, "precision": "bf16", "wall_time_s": 480, "test": {"f1": 81.06, "sentences": 3453}}))
    card = (export(model_dir, tmp_path) / "README.md").read_text()
    assert "XLMRobertaXLForTokenClassification" in card and "research use only" in card
    assert "f1 81.06" in card and "1046 steps" in card and "sentences" not in card.split("Test scores")[1][:60]
    assert "CRF" in card and 'aggregation_strategy="first"' in card

"""ONNX export: onnxruntime runs the graphs to the same logits and the same greedy outputs as trainformer."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers_interop import right_pad, train_toy_translator  # noqa: E402
from test_translation_e2e import make_pairs  # noqa: E402  (the toy EN->FR language)
from trainformer.config import from_dict  # noqa: E402
from trainformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from trainformer.errors import UserError  # noqa: E402
from trainformer.generation import generate  # noqa: E402
from trainformer.inference.translator import Translator  # noqa: E402
from trainformer.interop.onnx_export import (  # noqa: E402
    OnnxGenerator,
    OnnxModel,
    OnnxTranslator,
    export_onnx,
)
from trainformer.modeldir import LoadedModel, load_model_dir, save_model_dir  # noqa: E402
from trainformer.models import build_model  # noqa: E402

TOL = 1e-4  # fp32 graphs against fp32 PyTorch


def config(task: str, **model):
    return from_dict({"task": task, "model": {"dropout": 0.0, **model}, "train": {"precision": "fp32"}})


def save_and_export(model, cfg, root, tokenizer=None, labels=None) -> tuple[LoadedModel, object]:
    """Save `model` as a model dir under root/model, export it to root/onnx; (reloaded model, onnx dir)."""
    model_dir = save_model_dir(model, cfg, root / "model")
    if tokenizer is not None:
        tokenizer.save(model_dir / "tokenizer.json")
    if labels is not None:
        (model_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    loaded = load_model_dir(model_dir)
    out = root / "onnx"
    out.mkdir()
    files = export_onnx(loaded, out)
    assert files == sorted(p for p in out.iterdir())
    return loaded, out


@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    model, cfg, tokenizer = train_toy_translator()
    loaded, out = save_and_export(model, cfg, tmp_path_factory.mktemp("encdec"), tokenizer)
    return loaded, tokenizer, out


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# ---------------------------------------------------------------------------- encoder-decoder


@pytest.mark.slow
def test_export_writes_graphs_manifest_and_model_files(translation):
    loaded, _, out = translation
    names = {p.name for p in out.iterdir()}
    assert names == {"encoder.onnx", "decoder.onnx", "onnx.json", "config.json", "tokenizer.json"}
    m = json.loads((out / "onnx.json").read_text())
    assert m["family"] == "encoder_decoder" and m["opset"] >= 17
    assert m["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "sep": 5, "cls": 6}
    assert (m["n_layers"], m["n_heads"], m["head_dim"]) == (2, 4, 16)
    dec = {i["name"]: i for i in m["graphs"]["decoder"]["inputs"]}
    assert dec["past_key.1"]["shape"] == ["batch", 4, "past", 16] and dec["input_ids"]["dtype"] == "int64"
    assert dec["cross_value.0"]["shape"] == ["batch", 4, "src", 16]
    outputs = [o["name"] for o in m["graphs"]["decoder"]["outputs"]]
    assert outputs == ["logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1"]


@pytest.mark.slow
def test_encdec_graphs_equal_the_model_at_the_first_step_and_with_past(translation):
    loaded, tokenizer, out = translation
    model, onnx = loaded.model, OnnxModel(out)
    src = right_pad([[*tokenizer.encode(s), EOS_ID] for s in ("red cat .", "the big green dog house .", "car .")],
                    PAD_ID)  # (3, S), right-padded
    src_mask = src != PAD_ID
    tgt = torch.tensor([[BOS_ID, 9, 12, 20]] * 3)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        cache = model.new_cache()
        first = model.decode(tgt[:, :3], memory, src_mask, cache)  # (3, 3, V), past 0
        later = model.decode(tgt[:, 3:], None, src_mask, cache)  # (3, 1, V), past 3
    enc = onnx.run("encoder", input_ids=as_np(src), attention_mask=as_np(src_mask.long()))
    np.testing.assert_allclose(enc["memory"], as_np(memory), atol=TOL)
    cross = {k: v for k, v in enc.items() if k.startswith("cross_")}
    feeds = {"encoder_attention_mask": as_np(src_mask.long()), **cross, **onnx.empty_past(3)}
    step1 = onnx.run("decoder", input_ids=as_np(tgt[:, :3]), **feeds)
    np.testing.assert_allclose(step1["logits"], as_np(first), atol=TOL)
    past = {k.replace("present", "past"): v for k, v in step1.items() if k.startswith("present_")}
    step2 = onnx.run("decoder", input_ids=as_np(tgt[:, 3:]), **{**feeds, **past})
    np.testing.assert_allclose(step2["logits"], as_np(later), atol=TOL)
    np.testing.assert_allclose(step2["present_value.1"], as_np(cache.self_kv[1].v), atol=TOL)
    assert step2["present_key.0"].shape == (3, 4, 4, 16)


@pytest.mark.slow
def test_onnx_greedy_translation_equals_trainformer_greedy(translation):
    loaded, tokenizer, out = translation
    sentences = [e for e, _ in make_pairs(200, seed=7)] + ["   "]
    ours = [h[0] for h in Translator(loaded.model, tokenizer, loaded.cfg, precision="fp32")
            .translate(sentences, beam=1)]
    theirs = OnnxTranslator(out, threads=1).translate(sentences)
    assert theirs == ours
    assert theirs[-1] == "" and len(set(theirs)) > 100  # really translated, not one repeated string
    short = [h[0] for h in Translator(loaded.model, tokenizer, loaded.cfg, precision="fp32")
             .translate(sentences[:20], beam=1, max_len=3)]
    assert OnnxTranslator(out).translate(sentences[:20], max_len=3) == short  # the length limit too


# ---------------------------------------------------------------------------- decoder


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    """A random tiny decoder with rotary positions and grouped-query attention (2 query heads per K/V head).

    Untied with large weights: a tied random model mostly repeats its input.
    """
    cfg = config("lm", preset="tiny-decoder", vocab_size=40, position="rope", n_heads=4, n_kv_heads=2,
                 init_std=0.3, tie_embeddings=False)
    torch.manual_seed(0)
    return save_and_export(build_model(cfg.model), cfg, tmp_path_factory.mktemp("decoder"))


@pytest.mark.slow
def test_decoder_graph_equals_the_model_on_a_left_padded_batch_with_past(language_model):
    loaded, out = language_model
    model, onnx = loaded.model, OnnxModel(out)
    ids = torch.randint(7, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :4], mask[2, :1] = 0, 0  # left padding
    new = torch.tensor([[11], [12], [13]])
    with torch.no_grad():
        cache = model.new_cache()
        first = model(ids, mask.bool(), cache)  # (3, 6, V)
        later = model(new, None, cache)  # (3, 1, V)
    step1 = onnx.run("decoder", input_ids=as_np(ids), attention_mask=as_np(mask), **onnx.empty_past(3))
    np.testing.assert_allclose(step1["logits"], as_np(first), atol=TOL)
    past = {k.replace("present", "past"): v for k, v in step1.items() if k.startswith("present_")}
    assert past["past_key.0"].shape == (3, 2, 6, 8)  # KV heads, not query heads
    full_mask = np.concatenate([as_np(mask), np.ones((3, 1), np.int64)], axis=1)
    step2 = onnx.run("decoder", input_ids=as_np(new), attention_mask=full_mask, **past)
    np.testing.assert_allclose(step2["logits"], as_np(later), atol=TOL)


@pytest.mark.slow
def test_onnx_greedy_generation_equals_trainformer_greedy(language_model):
    loaded, out = language_model
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(7, 40, (n,), generator=g).tolist() for n in (3, 9, 1, 30)]  # 4 x 30 > 64 rows
    free = generate(loaded.model, prompts, 12, None, temperature=0.0)
    eos = free[0][2]  # a token the model does produce: row 0 stops at step 3 at the latest
    ours = generate(loaded.model, prompts, 12, eos, temperature=0.0)
    onnx = OnnxGenerator(out)
    assert onnx.generate(prompts, 12, eos) == ours
    assert onnx.generate(prompts, 12) == free
    assert len(ours[0]) < 12 and len({len(o) for o in ours}) > 1  # rows stopped at different steps


# ---------------------------------------------------------------------------- encoder


@pytest.mark.slow  # an export each: 3-5 s
@pytest.mark.parametrize("head", ["mlm", "tagging", "relation"])
def test_encoder_head_outputs_equal_the_model_with_padding(head, tmp_path):
    extra = {"tagging": dict(num_labels=5, crf=True),
             "relation": dict(num_labels=4, relation_pool="start_between")}.get(head, {})
    cfg = config("mlm", preset="tiny-encoder", vocab_size=40, head=head, **extra)
    torch.manual_seed(0)
    labels = [f"L{i}" for i in range(cfg.model.num_labels)] or None
    loaded, out = save_and_export(build_model(cfg.model), cfg, tmp_path, labels=labels)
    ids = torch.randint(7, 40, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:], mask[2, 6:] = 0, 0  # right padding
    ids = ids.masked_fill(mask == 0, PAD_ID)
    pos = (torch.tensor([0, 3, 1]), torch.tensor([2, 1, 5])) if head == "relation" else ()
    with torch.no_grad():
        want = loaded.model(ids, mask.bool(), *pos)
    feeds = dict(input_ids=as_np(ids), attention_mask=as_np(mask))
    if pos:
        feeds.update(e1_pos=as_np(pos[0]), e2_pos=as_np(pos[1]))
    np.testing.assert_allclose(OnnxModel(out).run("encoder", **feeds)["logits"], as_np(want), atol=TOL)
    manifest = json.loads((out / "onnx.json").read_text())
    assert manifest["head"] == head and manifest["labels"] == (labels or [])
    assert ("crf" in manifest) == (head == "tagging")


# ---------------------------------------------------------------------------- one-line errors


def one_line_error(loaded, tmp_path) -> str:
    with pytest.raises(UserError) as e:
        export_onnx(loaded, tmp_path)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written
    return str(e.value)


def test_character_cnn_quantized_and_missing_extra_are_one_line_errors(tmp_path, monkeypatch):
    cfg = config("ner", preset="tiny-encoder", vocab_size=40, head="tagging", num_labels=3, char_cnn=16)
    loaded = LoadedModel(cfg=cfg, model=build_model(cfg.model).eval(), path=tmp_path)
    assert "model.char_cnn" in one_line_error(loaded, tmp_path)
    cfg = config("lm", preset="tiny-decoder", vocab_size=40)
    model = build_model(cfg.model).eval()
    quantized = LoadedModel(cfg=cfg, model=model, path=tmp_path,
                            compression={"quantized": True, "quantization": "dynamic"})
    assert "quantized" in one_line_error(quantized, tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    assert '.[export]' in one_line_error(LoadedModel(cfg=cfg, model=model, path=tmp_path), tmp_path)
    with pytest.raises(UserError, match="onnx.json"):
        OnnxModel(tmp_path)

"""Compressed model dirs: save/load round trips through `load_model_dir`, no pickles, the
`prune` / `quantize` verbs, inference verbs on compressed dirs, and fine-tuning after pruning."""

import json
import pickle
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainformer.cli import main
from trainformer.compression import structured_prune
from trainformer.compression.magnitude import prunable_weights
from trainformer.compression.store import load_float_model
from trainformer.config import TokenizerConfig, from_dict
from trainformer.data.tokenizer import train_tokenizer
from trainformer.errors import UserError
from trainformer.modeldir import load_model_dir, save_model_dir
from trainformer.models import build_model, count_parameters
from trainformer.models.quantized import quantize_model
from trainformer.models.shapes import model_shapes

WORDS = {"red": "rouge", "blue": "bleu", "green": "vert", "cat": "chat", "dog": "chien",
         "house": "maison", "car": "voiture", "big": "grand", "small": "petit", "the": "le"}




def _pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(list(WORDS), k=rng.randint(2, 5))
        out.append((" ".join(words) + " .", " ".join(WORDS[w] for w in words) + " ."))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny translation model dir (random weights) with its tokenizer and a data file."""
    root = tmp_path_factory.mktemp("compress")
    pairs = _pairs(160)
    tsv = root / "pairs.tsv"
    tsv.write_text("en\tfr\n" + "".join(f"{e}\t{f}\n" for e, f in pairs), encoding="utf-8")
    tok_cfg = {"vocab_size": 100, "min_frequency": 1}
    tok = train_tokenizer((t for p in pairs for t in p), TokenizerConfig(**tok_cfg))
    cfg = from_dict({
        "task": "translation",
        "model": {"preset": "tiny-encdec", "vocab_size": tok.vocab_size, "n_heads": 4, "n_layers": 2,
                  "dropout": 0.0, "init_std": 0.1},
        "data": {"dataset": str(tsv), "tokenizer": tok_cfg, "max_tokens": 300, "valid_size": 6,
                 "test_size": 6},
        "optim": {"lr": 1e-3},
        "train": {"precision": "fp32", "device": "cpu", "progress": False, "log_every": 1,
                  "label_smoothing": 0.0},
        "eval": {"beam": 2, "samples": 0, "max_examples": 6},
    })
    torch.manual_seed(0)
    out = save_model_dir(build_model(cfg.model), cfg, root / "model")
    tok.save(out / "tokenizer.json")
    return out, tsv


def batch(vocab: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(5, vocab, (3, 7), generator=g), torch.randint(5, vocab, (3, 5), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, -2:] = False
    return src, tgt, mask


def outputs(model, vocab: int) -> torch.Tensor:
    src, tgt, mask = batch(vocab)
    with torch.no_grad():
        return model(src, tgt, mask).float()


def only_safe_files(path) -> bool:
    return all(f.suffix in (".json", ".safetensors") for f in path.iterdir())


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ----------------------------------------------------------------------------
# Round trips through load_model_dir
# ----------------------------------------------------------------------------


def test_structured_dir_round_trips_and_is_smaller(model_dir, tmp_path, no_unpickling):
    src_dir, _ = model_dir
    out = tmp_path / "pruned"
    assert main(["prune", str(src_dir), "--out", str(out), "--method", "structured", "--sparsity", "0.5",
                 "--calibrate", "0"]) == 0  # by weight norms, as structured_prune without data
    expected = load_float_model(src_dir).model
    full_params = count_parameters(expected)
    structured_prune(expected, 0.5)
    loaded = load_model_dir(out)
    compression = json.loads((out / "compression.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["layer_sizes"] == model_shapes(loaded.model) == model_shapes(expected)
    assert "pruned" not in compression  # config.json is the one record of the shapes
    assert model_shapes(build_model(loaded.cfg.model)) == model_shapes(expected)
    assert compression["history"][-1]["method"] == "structured"
    vocab = loaded.cfg.model.vocab_size
    assert torch.equal(outputs(loaded.model, vocab), outputs(expected, vocab))
    assert count_parameters(loaded.model) < 0.8 * full_params
    assert (out / "model.safetensors").stat().st_size < 0.8 * (src_dir / "model.safetensors").stat().st_size
    assert (out / "tokenizer.json").is_file() and only_safe_files(out)


def _pruned_config(src_dir, out) -> dict:
    """Prune `src_dir` by half into `out`; its config.json, parsed, for a test to edit."""
    assert main(["prune", str(src_dir), "--out", str(out), "--method", "structured", "--sparsity", "0.5",
                 "--calibrate", "0"]) == 0
    return json.loads((out / "config.json").read_text())


def test_pruned_dir_of_the_previous_format_still_loads(model_dir, tmp_path):
    """Before model.layer_sizes, a pruned dir kept its shapes in compression.json only."""
    src_dir, _ = model_dir
    out = tmp_path / "pruned"
    config = _pruned_config(src_dir, out)
    now = load_model_dir(out)
    compression = json.loads((out / "compression.json").read_text())
    compression["pruned"] = config["model"].pop("layer_sizes")  # the previous layout
    (out / "config.json").write_text(json.dumps(config))
    (out / "compression.json").write_text(json.dumps(compression))
    loaded = load_model_dir(out)
    assert model_shapes(loaded.model) == compression["pruned"] == model_shapes(now.model)
    vocab = loaded.cfg.model.vocab_size
    assert torch.equal(outputs(loaded.model, vocab), outputs(now.model, vocab))


def test_magnitude_dir_keeps_zeros_and_dense_shapes(model_dir, tmp_path, capsys):
    src_dir, _ = model_dir
    out = tmp_path / "sparse"
    assert main(["prune", str(src_dir), "--out", str(out), "--method", "magnitude", "--sparsity", "0.7"]) == 0
    assert "not faster" in capsys.readouterr().out  # the honest note is printed
    loaded = load_model_dir(out)
    weights = [w for _, w in prunable_weights(loaded.model)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.7) < 0.01
    assert model_shapes(loaded.model) == model_shapes(load_model_dir(src_dir).model)
    assert json.loads((out / "compression.json").read_text())["history"][0]["note"].startswith("unstructured")


@pytest.mark.parametrize("method", ["dynamic", "weight_only", "bf16"])
def test_quantized_dir_round_trips_exactly(model_dir, tmp_path, method, no_unpickling):
    src_dir, _ = model_dir
    out = tmp_path / method
    assert main(["quantize", str(src_dir), "--out", str(out), "--method", method]) == 0
    expected = quantize_model(load_float_model(src_dir).model, method)
    loaded = load_model_dir(out)
    vocab = loaded.cfg.model.vocab_size
    assert torch.equal(outputs(loaded.model, vocab), outputs(expected, vocab))
    assert loaded.compression["quantized"] is True and loaded.compression["quantization"] == method
    assert only_safe_files(out)
    saved = load_file(str(out / "model.safetensors"))
    if method == "bf16":
        assert all(v.dtype == torch.bfloat16 for v in saved.values() if v.is_floating_point())
    else:
        assert saved["layers.0.ffn.up.weight_int8"].dtype == torch.int8
        assert "layers.0.ffn.up.weight" not in saved
        # the tied embedding / output projection is int8 too, and stored once
        assert saved["tok_embed.weight_int8"].dtype == torch.int8 and "tok_embed.weight" not in saved
        assert loaded.compression["embedding"] == "int8"
    size = (out / "model.safetensors").stat().st_size
    assert size < (0.6 if method == "bf16" else 0.45) * (src_dir / "model.safetensors").stat().st_size


def test_quantized_dirs_of_older_versions_still_load(model_dir, tmp_path):
    """Before the embedding was quantized, int8 dirs kept it in fp32 (no "embedding" key)."""
    src_dir, _ = model_dir
    out = tmp_path / "old"
    assert main(["quantize", str(src_dir), "--out", str(out), "--method", "weight_only"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    float_embed = load_file(str(src_dir / "model.safetensors"))["tok_embed.weight"]
    del saved["tok_embed.weight_int8"], saved["tok_embed.weight_scale"]
    save_file({**saved, "tok_embed.weight": float_embed}, str(out / "model.safetensors"))
    info = json.loads((out / "compression.json").read_text())
    del info["embedding"]
    (out / "compression.json").write_text(json.dumps(info))
    loaded = load_model_dir(out)
    assert torch.equal(loaded.model.tok_embed.weight, float_embed)
    assert outputs(loaded.model, loaded.cfg.model.vocab_size).isfinite().all()


def test_pruned_sizes_of_the_previous_format_that_are_no_object_give_a_one_line_error(model_dir, tmp_path):
    src_dir, _ = model_dir
    out = tmp_path / "pruned"
    config = _pruned_config(src_dir, out)
    del config["model"]["layer_sizes"]
    (out / "config.json").write_text(json.dumps(config))
    compression = json.loads((out / "compression.json").read_text())
    (out / "compression.json").write_text(json.dumps({**compression, "pruned": [3, 4]}))
    with pytest.raises(UserError, match=r"compression.json: \"pruned\" must be an object"):
        load_model_dir(out)


def test_pruned_then_quantized_keeps_the_pruned_shapes(model_dir, tmp_path):
    src_dir, _ = model_dir
    pruned, quant = tmp_path / "pruned", tmp_path / "pruned-int8"
    assert main(["prune", str(src_dir), "--out", str(pruned), "--sparsity", "0.5", "--heads-only"]) == 0
    assert main(["quantize", str(pruned), "--out", str(quant), "--method", "dynamic"]) == 0
    fp32, int8 = load_model_dir(pruned), load_model_dir(quant)
    assert int8.cfg.model.layer_sizes == fp32.cfg.model.layer_sizes
    assert model_shapes(int8.model) == model_shapes(fp32.model)
    assert [h["op"] for h in int8.compression["history"]] == ["prune", "quantize"]
    assert all(ffn == 64 for k, ffn in fp32.cfg.model.layer_sizes.items() if k.endswith("d_ff"))
    vocab = fp32.cfg.model.vocab_size
    ref, out = outputs(fp32.model, vocab), outputs(int8.model, vocab)
    assert (out - ref).norm() / ref.norm() < 0.05


# ----------------------------------------------------------------------------
# Inference verbs and user errors
# ----------------------------------------------------------------------------


def test_translate_and_evaluate_accept_compressed_dirs(model_dir, tmp_path):
    src_dir, tsv = model_dir
    pruned, quant = tmp_path / "p", tmp_path / "q"
    assert main(["prune", str(src_dir), "--out", str(pruned), "--sparsity", "0.25"]) == 0
    assert main(["quantize", str(pruned), "--out", str(quant), "--method", "weight_only"]) == 0
    lines = tmp_path / "in.txt"
    lines.write_text("red cat .\n\nthe big dog .\n", encoding="utf-8")
    small = tmp_path / "small.tsv"
    small.write_text("".join(tsv.read_text().splitlines(keepends=True)[:5]), encoding="utf-8")
    for d in (pruned, quant):
        out = tmp_path / f"{d.name}.txt"
        assert main(["translate", str(d), "-i", str(lines), "-o", str(out), "--beam", "2",
                     "--max-len", "6", "--device", "cpu"]) == 0
        assert len(out.read_text().split("\n")) == 4 and out.read_text().split("\n")[1] == ""
        assert main(["evaluate", str(d), "--data", str(small), "--beam", "1", "--device", "cpu",
                     "--hyps", str(tmp_path / "hyp.txt")]) == 0


def test_user_errors_are_one_line(model_dir, tmp_path, capsys):
    src_dir, _ = model_dir
    quant = tmp_path / "q"
    assert main(["quantize", str(src_dir), "--out", str(quant), "--method", "bf16"]) == 0
    cases = [
        (["prune", str(src_dir), "--out", str(tmp_path / "a"), "--sparsity", "1.0"], "--sparsity"),
        (["prune", str(src_dir), "--out", str(quant), "--sparsity", "0.5"], "not empty"),
        (["prune", str(src_dir), "--out", str(src_dir), "--sparsity", "0.5"], "input model dir"),
        (["prune", str(quant), "--out", str(tmp_path / "b"), "--sparsity", "0.5"], "already quantized"),
        (["prune", str(src_dir), "--out", str(tmp_path / "c"), "--sparsity", "0.5", "--method",
          "magnitude", "--heads-only"], "--heads-only"),
        (["quantize", str(quant), "--out", str(tmp_path / "d")], "already quantized"),
        (["prune", str(src_dir), "--out", str(tmp_path / "e"), "--sparsity", "0.5", "--method",
          "magnitude", "--calibrate", "2"], "--calibrate"),
        (["prune", str(src_dir), "--out", str(tmp_path / "f"), "--sparsity", "0.5", "--distill", "0.5"],
         "--distill"),  # distillation is a way of fine-tuning: without --finetune-steps it is a mistake
    ]
    capsys.readouterr()
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------
# Fine-tuning after pruning, through the trainer
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method,distill", [("structured", 0.0), ("magnitude", 0.0), ("structured", 0.5)])
def test_finetuning_after_pruning(model_dir, tmp_path, method, distill):
    src_dir, _ = model_dir
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    common = ["--method", method, "--sparsity", "0.5"]
    assert main(["prune", str(src_dir), "--out", str(plain), *common]) == 0
    assert main(["prune", str(src_dir), "--out", str(tuned), *common, "--finetune-steps", "3",
                 "--distill", str(distill), "--set", "optim.lr=0.01"]) == 0
    before, after = load_file(str(plain / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    key = "layers.0.ffn.up.weight"
    assert not torch.equal(before[key], after[key])  # it trained
    if method == "magnitude":  # pruned weights stayed exactly zero, the others moved
        for name in before:
            if name.endswith("weight") and ("attn" in name or "ffn" in name):
                assert torch.equal(before[name] == 0, after[name] == 0), name
    history = json.loads((tuned / "compression.json").read_text())["history"]
    assert history[-1]["finetune"]["steps"] == 3 and "bleu" in history[-1]["finetune"]["valid"]
    assert history[-1]["finetune"]["distill"] == distill
    assert only_safe_files(tuned)  # the run's pickled optimizer state stayed out of the model dir
    assert load_model_dir(tuned).model is not None


def test_calibrated_pruning_scores_by_activations_on_the_task_data(model_dir, tmp_path):
    """--calibrate N runs N training batches of the model's own task through the model and
    removes the units that write the least there; the result saves, loads and translates."""
    src_dir, _ = model_dir
    out = tmp_path / "calibrated"
    assert main(["prune", str(src_dir), "--out", str(out), "--sparsity", "0.5", "--calibrate", "2"]) == 0
    assert main(["prune", str(src_dir), "--out", str(tmp_path / "default"), "--sparsity", "0.5"]) == 0
    for path in (out, tmp_path / "default"):  # calibrating is the default for structured pruning
        info = json.loads((path / "compression.json").read_text())
        assert info["history"][-1]["score"].startswith("activations on calibration batches")
    loaded = load_model_dir(out)
    assert count_parameters(loaded.model) < count_parameters(load_model_dir(src_dir).model)
    assert outputs(loaded.model, loaded.cfg.model.vocab_size).isfinite().all()


def test_bad_layer_sizes_in_config_json_name_the_file(model_dir, tmp_path):
    from trainformer.errors import ConfigError

    src_dir, _ = model_dir
    out = tmp_path / "pruned"
    config = _pruned_config(src_dir, out)
    config["model"]["layer_sizes"] = {"layers.7.ffn.d_ff": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: model\.layer_sizes\['layers\.7\.ffn\.d_ff'\]: the model has no"):
        load_model_dir(out)

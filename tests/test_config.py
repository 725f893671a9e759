"""Config strictness: unknown keys, typos, types, ranges, overrides, recipes."""

import pytest

from trainformer.config import (
    Config,
    apply_overrides,
    from_dict,
    load_recipe,
    parse_override,
    recipe_names,
    to_dict,
)
from trainformer.errors import ConfigError


def test_defaults_round_trip():
    cfg = Config()
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_top_level_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        from_dict({"trian": {}})


def test_misspelled_nested_key_names_full_path_and_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_stpes'.*'train\.max_steps'"):
        from_dict({"train": {"max_stpes": 10}})


def test_deeply_nested_key():
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.vocab_sise.*data\.tokenizer\.vocab_size"):
        from_dict({"data": {"tokenizer": {"vocab_sise": 100}}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got 'fast'"),
        ({"train": {"max_steps": 1.5}}, r"train\.max_steps: expected an integer"),
        ({"train": {"compile": "yes"}}, r"train\.compile: expected true or false"),
        ({"model": {"position": "sinusodial"}}, r"model\.position: expected one of .*did you mean 'sinusoidal'"),
        ({"optim": {"betas": [0.9]}}, r"optim\.betas: expected a list of"),
        ({"model": "big"}, r"model: expected a mapping"),
    ],
)
def test_wrong_types_name_key_and_expectation(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lr": -1.0}}, r"optim\.lr: expected a number > 0, got -1\.0"),
        ({"model": {"dropout": 1.5}}, r"model\.dropout: expected a number in \[0, 1\)"),
        ({"model": {"d_model": 100, "n_heads": 3}}, r"model\.n_heads: expected a divisor"),
        ({"train": {"grad_accum": 0}}, r"train\.grad_accum"),
        ({"train": {"precision": "fp16", "device": "cpu"}}, r"fp16 needs a CUDA device"),
    ],
)
def test_out_of_range_values(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_int_accepted_for_float_and_converted():
    cfg = from_dict({"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("optim.lr=3e-4", ["optim", "lr"], 3e-4),
        ("train.max_steps=100", ["train", "max_steps"], 100),
        ("train.compile=true", ["train", "compile"], True),
        ("model.preset=tiny-encdec", ["model", "preset"], "tiny-encdec"),
        ("model.n_kv_heads=null", ["model", "n_kv_heads"], None),
        ("optim.betas=[0.9, 0.95]", ["optim", "betas"], [0.9, 0.95]),
    ],
)
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["optim.lr", "=3", "optim..lr=1"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_override_applies_and_is_validated():
    data = apply_overrides({"optim": {"lr": 1e-3}}, ["optim.lr=2e-4", "train.max_steps=7"])
    cfg = from_dict(data)
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="optim.lrr"):
        from_dict(apply_overrides({}, ["optim.lrr=1"]))


def test_preset_fills_model_and_explicit_keys_win():
    cfg = from_dict({"model": {"preset": "transformer-base", "dropout": 0.2}})
    assert cfg.model.d_model == 512 and cfg.model.n_layers == 6
    assert cfg.model.dropout == 0.2
    with pytest.raises(ConfigError, match="did you mean 'transformer-base'"):
        from_dict({"model": {"preset": "transformer-bse"}})


def test_every_builtin_recipe_loads():
    names = recipe_names()
    assert "translate-en-fr" in names
    for name in names:
        cfg = load_recipe(name)
        assert cfg.description, f"recipe {name} needs a description"


def test_unknown_recipe_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'translate-en-fr'"):
        load_recipe("translate-en-frr")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_recipe(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'train\.lr'"):
        load_recipe(typo)

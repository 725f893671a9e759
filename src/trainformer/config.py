"""Strict, typed configuration.

One dataclass per concern (model, data, optim, train, parallel, eval); a
recipe is a YAML file that mirrors them. Loading is strict: an unknown key is
an error that names the key and the closest valid one, a wrong type or an
out-of-range value is an error that names the key and what was expected.
Each component receives its own sub-config, never the whole tree.

    cfg = load_recipe("translate-en-fr", overrides=["optim.lr=3e-4"])
    cfg.optim.lr  # 0.0003
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from trainformer.errors import ConfigError
from trainformer.presets import get_preset

RECIPE_DIR = Path(__file__).parent / "recipes"


# ----------------------------------------------------------------------------
# The dataclasses. Field order is the order they are written to config.yaml.
# ----------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of the network. See `trainformer.presets` for named sizes."""

    family: Literal["encoder_decoder", "encoder", "decoder"] = "encoder_decoder"
    preset: str | None = None  # named size; explicit keys in the recipe win over it
    vocab_size: int = 0  # 0: taken from the tokenizer at build time
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    n_layers: int = 3  # encoder layers (encoder_decoder, encoder) or decoder layers (decoder)
    n_decoder_layers: int | None = None  # encoder_decoder only; None = n_layers
    d_ff: int = 1024
    max_len: int = 512  # longest sequence the position encoding supports
    dropout: float = 0.1
    position: Literal["sinusoidal", "learned", "rope"] = "sinusoidal"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_first: bool = True  # pre-norm; False = post-norm as in Vaswani et al. 2017
    norm_eps: float = 1e-5
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True  # share embedding and output head (and src/tgt embeddings)
    scale_embedding: bool = True  # multiply token embeddings by sqrt(d_model)
    num_labels: int = 0  # tagging / relation heads; 0: taken from the data
    head: Literal["lm", "mlm", "tagging", "relation"] = "lm"
    crf: bool = False  # tagging head: learn tag-path scores with a linear-chain CRF loss
    # tagging: filters of a CNN over each word's UTF-8 bytes, whose output is added to the
    # word's subword embeddings (0 = off); see `trainformer.nn.CharCNN`
    char_cnn: int = 0
    # encoder: normalise the sum of token and position embeddings before the first layer (BERT,
    # RoBERTa); with norm_first=false it is the BERT layout, so BERT checkpoints import exactly
    embed_norm: bool = False
    # relation head: what it classifies. "start": the two entity-start markers' states;
    # "start_between": those and the mean state of the tokens between the two markers
    relation_pool: Literal["start", "start_between"] = "start"
    init_std: float = 0.02
    # per-module sizes that differ from n_heads / n_kv_heads / d_ff, keyed by the module's path
    # (PATH.heads, PATH.kv_heads, PATH.d_ff; e.g. layers.0.ffn.d_ff: 700); written by structured
    # pruning (`trainformer prune`), empty for every other model
    layer_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "byte_bpe", "wordpiece"] = "bpe"
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = False
    path: str | None = None  # an existing tokenizer.json to use instead of training one


@dataclass
class DataConfig:
    dataset: str = "tatoeba-en-fr"  # a dataset name (see trainformer.data.registry) or a path
    format: str | None = None  # reader for a path: tsv, parallel, jsonl, conll, semeval, dailydialog, text
    src_lang: str = "en"
    tgt_lang: str = "fr"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_tokens: int = 4096  # token budget of one micro-batch (source or target, the larger)
    max_len: int = 128  # longer examples are skipped (counted) or truncated, by policy
    bad_lines: Literal["skip", "error"] = "skip"
    valid_size: float = 0.02  # fraction (<1) or count (>=1) of groups
    test_size: float = 0.02
    split_seed: int = 1234
    limit: int = 0  # use only the first N examples after the split (0: all); for smoke runs
    seq_len: int = 256  # language modelling: length of a packed row
    pack: bool = True  # language modelling: concatenate documents into rows
    doc_attention: bool = False  # packed rows: keep attention inside each document
    mlm_probability: float = 0.15
    # tagging: in training, each word's subwords become <unk> with this probability, so the model
    # must tag from context (names unseen in training are the rule at test time)
    word_dropout: float = 0.0
    # tagging: in training, each word seen only once in the training data becomes <unk> with this
    # probability, its characters kept (Lample et al. 2016): practice at names never seen before
    rare_word_dropout: float = 0.0
    # tagging: consecutive sentences (file or input order) are read together in windows of up to
    # this many subwords, so each is tagged with its neighbours in view (0: each sentence alone)
    context_window: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.01
    fused: bool = True
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    warmup_steps: int = 400
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of lr
    # Where cosine/linear decay ends: at train.max_steps, or at whichever of max_steps and
    # the train.max_minutes budget comes first ("budget": the wall clock moves the schedule,
    # so two runs are not step-for-step identical; resume continues from the saved clock).
    decay_horizon: Literal["steps", "budget"] = "steps"
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. Training stops cleanly and evaluates
    max_epochs: int = 0  # 0 = no limit
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    label_smoothing: float = 0.1
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N; a CPU run keeps freed memory for reuse (Linux, glibc)
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave the default
    log_every: int = 20
    eval_every: int = 500  # steps; 0 = only at the end
    ckpt_every: int = 500  # steps; 0 = only at the end
    ckpt_every_minutes: float = 0.0
    keep_last: int = 3
    average_last: int = 0  # average the last N checkpoints at the end (fairseq style); 0 = off
    early_stopping: int = 0  # evaluations without improvement before stopping; 0 = off
    # at the end, test and model/ use the weights that scored best on valid (saved at each new
    # best in checkpoints/best), when they beat the last (or averaged) ones
    keep_best: bool = False
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    progress: bool = True


@dataclass
class ParallelConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class EvalConfig:
    beam: int = 4
    length_penalty: float = 1.0
    max_len_a: float = 1.2  # generation stops at a * source_length + b tokens
    max_len_b: int = 10
    batch_tokens: int = 8000
    samples: int = 5  # sample outputs printed at the end of a run
    metric: str = "auto"  # the task's main metric (bleu, f1, ppl...)
    max_examples: int = 0  # cap on examples for periodic evaluation; 0 = all
    # ner: weight of the tag-bigram prior (counted on train) in Viterbi decoding. None = chosen
    # on valid at each evaluation from TRANSITION_WEIGHTS; 0 = only forbid invalid BIO.
    transition_weight: float | None = None


@dataclass
class Config:
    """A whole recipe. `task` selects data handling, loss and metrics."""

    task: Literal["translation", "ner", "relations", "mlm", "lm", "chat"] = "translation"
    name: str = "run"
    description: str = ""
    init_from: str | None = None  # a model/ dir or run dir to start from (fine-tuning)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ----------------------------------------------------------------------------
# Range checks: key -> (predicate, what was expected)
# ----------------------------------------------------------------------------

_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_PROBABILITY = (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")

_CHECKS: dict[str, tuple[Any, str]] = {
    "model.vocab_size": _NON_NEGATIVE,
    "model.d_model": _POSITIVE,
    "model.n_heads": _POSITIVE,
    "model.n_layers": _NON_NEGATIVE,
    "model.d_ff": _POSITIVE,
    "model.max_len": _POSITIVE,
    "model.dropout": _PROBABILITY,
    "model.norm_eps": _POSITIVE,
    "model.init_std": _POSITIVE,
    "model.num_labels": _NON_NEGATIVE,
    "model.char_cnn": _NON_NEGATIVE,
    "data.tokenizer.vocab_size": (lambda v: v >= 64, "an integer >= 64"),
    "data.max_tokens": _POSITIVE,
    "data.max_len": (lambda v: v >= 2, "an integer >= 2"),
    "data.valid_size": _NON_NEGATIVE,
    "data.test_size": _NON_NEGATIVE,
    "data.limit": _NON_NEGATIVE,
    "data.seq_len": (lambda v: v >= 2, "an integer >= 2"),
    "data.mlm_probability": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "data.word_dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "data.context_window": _NON_NEGATIVE,
    "data.rare_word_dropout": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "optim.lr": _POSITIVE,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.warmup_steps": _NON_NEGATIVE,
    "optim.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "optim.clip_grad": _NON_NEGATIVE,
    "train.seed": _NON_NEGATIVE,
    "train.max_steps": _POSITIVE,
    "train.max_minutes": _NON_NEGATIVE,
    "train.max_epochs": _NON_NEGATIVE,
    "train.grad_accum": _POSITIVE,
    "train.label_smoothing": _PROBABILITY,
    "train.threads": _NON_NEGATIVE,
    "train.log_every": _POSITIVE,
    "train.eval_every": _NON_NEGATIVE,
    "train.ckpt_every": _NON_NEGATIVE,
    "train.ckpt_every_minutes": _NON_NEGATIVE,
    "train.keep_last": _POSITIVE,
    "train.average_last": _NON_NEGATIVE,
    "train.early_stopping": _NON_NEGATIVE,
    "train.max_bad_steps": _POSITIVE,
    "eval.beam": _POSITIVE,
    "eval.max_len_a": _NON_NEGATIVE,
    "eval.max_len_b": _NON_NEGATIVE,
    "eval.batch_tokens": _POSITIVE,
    "eval.samples": _NON_NEGATIVE,
    "eval.max_examples": _NON_NEGATIVE,
    "eval.transition_weight": (lambda v: v is None or v >= 0, "a number >= 0 or null (chosen on valid)"),
}


def _validate(cfg: Config) -> None:
    for key, (ok, expected) in _CHECKS.items():
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    m = cfg.model
    kv = m.n_kv_heads or m.n_heads
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads: expected a divisor of model.d_model={m.d_model}, got {m.n_heads}"
        )
    if m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads: expected a divisor of model.n_heads={m.n_heads}, got {kv}")
    if m.position == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.position: rope needs an even head dimension (d_model / n_heads)")
    if m.relation_pool != "start" and m.head != "relation":
        raise ConfigError(f"model.relation_pool: only the relation head pools (model.head is {m.head!r})")
    if m.crf and m.head != "tagging":
        raise ConfigError(f"model.crf: only the tagging head has a CRF (model.head is {m.head!r})")
    if m.embed_norm and m.family != "encoder":
        raise ConfigError(f"model.embed_norm: only the encoder family has it (model.family is {m.family!r})")
    if m.char_cnn and (m.head != "tagging" or m.family != "encoder"):
        raise ConfigError(f"model.char_cnn: only the tagging encoder reads word characters "
                          f"(model.family is {m.family!r}, model.head {m.head!r})")
    for key in ("word_dropout", "rare_word_dropout"):
        if getattr(cfg.data, key) and m.head != "tagging":
            raise ConfigError(f"data.{key}: only tagging tasks drop words (model.head is {m.head!r})")
    if cfg.data.context_window and m.head != "tagging":
        raise ConfigError(f"data.context_window: only tagging tasks read sentences in windows (model.head is {m.head!r})")
    if cfg.data.context_window > min(cfg.data.max_len, m.max_len):
        raise ConfigError(f"data.context_window: expected at most data.max_len and model.max_len "
                          f"({min(cfg.data.max_len, m.max_len)}), got {cfg.data.context_window}")
    if m.crf and cfg.eval.transition_weight is not None:
        raise ConfigError("eval.transition_weight: weighs the counted tag prior; a model.crf model decodes "
                          "with its learned transition scores (set it to null, or model.crf: false)")
    if m.crf and cfg.parallel.strategy == "fsdp":
        raise ConfigError("model.crf: the CRF scores are read outside the forward pass, which FSDP "
                          "shards; use parallel.strategy: ddp")
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.optim.decay_horizon == "budget" and not cfg.train.max_minutes:
        raise ConfigError("optim.decay_horizon: 'budget' needs train.max_minutes > 0")
    if not 0.0 < cfg.optim.betas[0] < 1.0 or not 0.0 < cfg.optim.betas[1] < 1.0:
        raise ConfigError(f"optim.betas: expected two numbers in (0, 1), got {cfg.optim.betas!r}")


# ----------------------------------------------------------------------------
# Strict conversion from plain data (YAML) to dataclasses
# ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        key, value = get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type `tp`; return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this file


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    full = f"{prefix}.{key}" if prefix else key
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {full!r}{hint} (valid: {', '.join(names)})")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix)
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a plain mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    data = _apply_preset(data)
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg


def _apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Fill `model` from its named preset; keys the recipe sets explicitly win."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return data

    preset = get_preset(str(model["preset"]))
    return {**data, "model": {**preset, **model}}


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe data for a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------
# Recipes and overrides
# ----------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Names of the built-in recipes (files in trainformer/recipes)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A built-in recipe name or a path to a YAML file -> the file's path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    builtin = RECIPE_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = recipe_names()
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"no recipe named {str(name_or_path)!r}{hint} (built-in: {', '.join(names)}; or give a .yaml path)"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read recipe ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; accept numbers written that way.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides to raw recipe data (validated later by `from_dict`)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a built-in recipe (by name) or a YAML file, apply ``--set`` overrides, validate."""
    path = resolve_recipe(name_or_path)
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

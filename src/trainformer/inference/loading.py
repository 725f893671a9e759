"""Loading a `model/` directory (or an ensemble of them) into the class that does its task's inference."""

from __future__ import annotations

from pathlib import Path

from trainformer.data.markers import MARKERS
from trainformer.data.tokenizer import TextTokenizer
from trainformer.errors import UserError
from trainformer.inference.bio import TRANSITIONS_FILE, load_prior, mean_prior
from trainformer.inference.chatbot import Chatbot
from trainformer.inference.crf import learned_prior
from trainformer.inference.ensemble import is_ensemble, member_dirs
from trainformer.inference.relations import RelationClassifier
from trainformer.inference.sampling import SamplingSettings, TorchGenerator
from trainformer.inference.tagger import Tagger
from trainformer.inference.translator import Translator
from trainformer.modeldir import LoadedModel, load_model_dir
from trainformer.training.device import resolve_device


def load_for_task(model_dir: str | Path, task: str | tuple[str, ...], device: str = "auto") -> tuple[LoadedModel, TextTokenizer]:
    """Model and tokenizer of `model_dir`, checking that it was trained for `task`."""
    loaded = load_model_dir(model_dir, resolve_device(device, key="--device"))
    tasks = (task,) if isinstance(task, str) else task
    if loaded.cfg.task not in tasks:
        raise UserError(f"{loaded.path}: a {loaded.cfg.task!r} model, expected {' or '.join(map(repr, tasks))}")
    if not loaded.tokenizer_path.is_file():
        raise UserError(f"{loaded.path}: tokenizer.json is missing")
    return loaded, TextTokenizer.load(loaded.tokenizer_path)


def load_members(model_dir: str | Path, task: str, device: str = "auto") -> list[tuple[LoadedModel, TextTokenizer]]:
    """(model, tokenizer) of each member of the ensemble at `model_dir`, or of the one model there;
    every member has the same labels."""
    dirs = member_dirs(model_dir) if is_ensemble(model_dir) else [model_dir]
    members = [load_for_task(d, task, device) for d in dirs]
    if any(m.labels != members[0][0].labels for m, _ in members):
        raise UserError(f"{model_dir}: its members' labels.json differ")
    return members


def load_translator(model_dir: str | Path, device: str = "auto", precision: str = "auto") -> Translator:
    """A `Translator` for a trained ``translation`` model directory."""
    loaded, tokenizer = load_for_task(model_dir, "translation", device)
    return Translator(loaded.model, tokenizer, loaded.cfg, precision=precision)


def load_tagger(model_dir: str | Path, device: str = "auto", precision: str = "auto") -> Tagger:
    """A `Tagger` for a trained ``ner`` model directory, or an ensemble of them (see `ensemble`),
    decoding with the learned CRF scores or the saved prior of each member (their mean)."""
    members = load_members(model_dir, "ner", device)
    loaded, tokenizer = members[0]
    if not loaded.labels:
        raise UserError(f"{loaded.path}: labels.json is missing")
    priors = [learned_prior(m.model) or load_prior(m.path / TRANSITIONS_FILE, m.labels) for m, _ in members]
    cfg = loaded.cfg
    chars = any(m.cfg.model.char_cnn for m, _ in members)
    if len({m.cfg.data.context_window for m, _ in members}) > 1:
        raise UserError(f"{model_dir}: the members were trained with different data.context_window; "
                        "an ensemble reads its sentences one way for all")
    return Tagger([m.model for m, _ in members], tokenizer, loaded.labels, cfg.model.max_len, cfg.eval.batch_tokens,
                  precision, mean_prior(priors, model_dir), chars, cfg.data.context_window)


def load_classifier(model_dir: str | Path, device: str = "auto", precision: str = "auto") -> RelationClassifier:
    """A `RelationClassifier` for a trained ``relations`` model directory, or an ensemble of them
    (see `ensemble`)."""
    members = load_members(model_dir, "relations", device)
    loaded, tokenizer = members[0]
    if not loaded.labels:
        raise UserError(f"{loaded.path}: labels.json is missing")
    if any(tokenizer.token_to_id(m) is None for m in MARKERS):
        raise UserError(f"{loaded.path}: tokenizer.json has no entity markers ({' '.join(MARKERS)})")
    c = loaded.cfg
    return RelationClassifier([m.model for m, _ in members], tokenizer, loaded.labels, c.model.max_len,
                              c.eval.batch_tokens, precision)


def load_chatbot(model_dir: str | Path, settings: SamplingSettings, system: str | None = None,
                 device: str = "auto", precision: str = "auto") -> Chatbot:
    """A `Chatbot` on a trained ``chat`` model directory, sampling with our engine."""
    loaded, tokenizer = load_for_task(model_dir, "chat", device)
    engine = TorchGenerator(loaded.model, settings.seed, precision)
    return Chatbot(engine, tokenizer, loaded.cfg.model.max_len, settings, system)

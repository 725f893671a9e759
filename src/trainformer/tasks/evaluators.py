"""`trainformer evaluate MODEL_DIR --data FILE`: a trained model's metrics on a data file.

One function per task, all with the same arguments: the model's resolved
`Config`, its directory, the data file, and the runtime choices (``device``,
``precision``, the ``bad_lines`` policy); each returns a flat dict of
metrics. Translation also takes the beam and writes its hypotheses to a
file. The CLI unpacks its flags into them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainformer.config import Config
from trainformer.data import readers
from trainformer.data.cache import Ragged
from trainformer.data.chat_template import ChatTemplate
from trainformer.data.splits import group_references
from trainformer.errors import UserError
from trainformer.inference.bio import to_bio
from trainformer.inference.common import inference_autocast
from trainformer.inference.loading import (
    load_classifier,
    load_for_task,
    load_tagger,
    load_translator,
)
from trainformer.tasks.chat import assistant_perplexity, build_examples, clean_dialogue
from trainformer.tasks.lm import causal_loss, eval_rows, perplexity, row_batches
from trainformer.tasks.mlm import masked_lm_scores, single_rows
from trainformer.tasks.relations import score_relations
from trainformer.tasks.tagging import score_tagger
from trainformer.tasks.translation import score_translations
from trainformer.textio import read_lines


def read_eval_file(path: str | Path, bad_lines: str, read: Callable[[Path, str], readers.ReadResult],
                   empty: str) -> readers.ReadResult:
    """``read(path, bad_lines)`` of the ``--data`` file; a UserError when it is missing or holds
    nothing usable (`empty` says so, and what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data: file not found: {path}")
    result = read(path, bad_lines)
    if not result.examples:
        raise UserError(f"{path}: {empty}")
    return result


def evaluate_translation(cfg: Config, model_dir: str | Path, data: str | Path | None, device: str = "auto",
                         precision: str = "auto", bad_lines: str = "skip", beam: int | None = None,
                         hyps: str | Path | None = None, split: str | None = None) -> dict[str, Any]:
    """sacreBLEU and chrF of a ``translation`` model on a parallel TSV file (with a header), or on
    its own held-out `split` ("valid" / "test", rebuilt as its training run made it), against
    every reference of each source; the hypotheses go to `hyps` (default: DATA's stem, or the
    split's name, + ``.hyp.txt`` in the current folder), one per source. `beam`: default the
    model's ``eval.beam``."""
    translator = load_translator(model_dir, device, precision)
    model_cfg = translator.cfg
    if split is not None:
        from trainformer.tasks.translation import held_out_split

        sources, refs = held_out_split(model_dir, split)
        stem, bad = split, 0
    else:
        path = Path(data)
        if not path.is_file():
            raise UserError(f"--data: file not found: {path}")
        result = readers.read_parallel_tsv(path, model_cfg.data.src_lang, model_cfg.data.tgt_lang,
                                           bad_lines=bad_lines)
        if not result.examples:
            raise UserError(f"{path}: no usable sentence pairs")
        pairs = result.examples
        grouped = group_references([p.src for p in pairs], [p.tgt for p in pairs], range(len(pairs)))
        sources, refs = [s for s, _ in grouped], [r for _, r in grouped]
        stem, bad = path.stem, result.bad.total
    texts = [n[0] for n in translator.translate(sources, beam=beam or model_cfg.eval.beam)]
    hyp_path = Path(hyps) if hyps else Path.cwd() / f"{stem}.hyp.txt"
    hyp_path.write_text("".join(h + "\n" for h in texts), encoding="utf-8")
    scores = score_translations(texts, refs)
    return {
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "sources": len(sources),
        "references": sum(map(len, refs)),
        "bad_lines": bad,
        "bleu_signature": scores["bleu_signature"],
        "chrf_signature": scores["chrf_signature"],
        "hypotheses": str(hyp_path),
    }


def evaluate_ner(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                 precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """seqeval P/R/F1 (micro and per type) of a ``ner`` model (or ensemble) on a CoNLL-format file."""
    tagger = load_tagger(model_dir, device, precision)
    result = read_eval_file(data, bad_lines, readers.read_conll, "no usable examples (expected CoNLL: "
                            "one 'token ... tag' per line, blank lines between sentences)")
    gold = [to_bio(s.tags) for s in result.examples]
    return {**score_tagger(tagger, [s.tokens for s in result.examples], gold), "bad_lines": result.bad.total,
            "truncated": tagger.truncated}


def evaluate_relations(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                       precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """The official SemEval-2010 Task 8 scores of a ``relations`` model (or ensemble) on a SemEval TSV file."""
    classifier = load_classifier(model_dir, device, precision)
    result = read_eval_file(data, bad_lines, readers.read_semeval,
                            "no usable examples (expected a header, then id<TAB>sentence<TAB>relation)")
    return {**score_relations(classifier, result.examples), "bad_lines": result.bad.total,
            "truncated": classifier.truncated}


def evaluate_mlm(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                 precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """Masked-token accuracy and perplexity of an ``mlm`` model on a text file (one text per line).

    Each non-empty line is one row ``<cls> line <sep>`` (cut to data.seq_len);
    the masking is fixed (seed 0), so two models are compared on the same tokens.
    """
    loaded, tokenizer = load_for_task(model_dir, "mlm", device)
    lines = [t for t in read_lines(str(data)) if t.strip()]
    if not lines:
        raise UserError(f"{data}: no text (expected one text per line)")
    docs = Ragged.from_lists(tokenizer.encode_batch(lines))
    rows = single_rows(docs, min(cfg.data.seq_len, cfg.model.max_len))
    batch_rows = max(1, cfg.eval.batch_tokens // max(cfg.data.seq_len, 1))
    scores = masked_lm_scores(loaded.model, rows, tokenizer, cfg.data.mlm_probability, batch_rows,
                              seed=0, precision=precision)
    return {**scores, "texts": len(lines)}


def evaluate_lm(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """Perplexity of a plain-text file (documents separated by blank lines) under an lm (or chat) model."""
    result = read_eval_file(data, bad_lines, lambda p, policy: readers.read_text(p, "blank_line", policy),
                            "no text to score")
    loaded, tokenizer = load_for_task(model_dir, ("lm", "chat"), device)
    model, seq_len = loaded.model, loaded.cfg.data.seq_len
    docs = Ragged.from_lists(tokenizer.encode_batch([e.text for e in result.examples]))
    device_ = next(model.parameters()).device
    batch_rows = max(1, loaded.cfg.eval.batch_tokens // seq_len)
    doc_attention = loaded.cfg.data.doc_attention
    with torch.inference_mode(), inference_autocast(device_, precision):
        metrics = perplexity(lambda b: causal_loss(model, b, 0.0, doc_attention),
                             row_batches(eval_rows(docs, seq_len), batch_rows), device_)
    return {**metrics, "documents": len(result.examples), "bad_lines": result.bad.total}


def evaluate_chat(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                  precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """Perplexity of the assistant turns of a DailyDialog-format file (both role assignments)."""
    result = read_eval_file(data, bad_lines, readers.read_dailydialog,
                            "no dialogues (expected utterances ending with __eou__, one dialogue a line)")
    loaded, tokenizer = load_for_task(model_dir, "chat", device)
    template = ChatTemplate(tokenizer)
    dialogues = [clean_dialogue(d.utterances) for d in result.examples]
    window = min(loaded.cfg.data.max_len, loaded.cfg.model.max_len)
    ids, loss, skipped = build_examples(dialogues, template, window + 1)
    model = loaded.model
    device_ = next(model.parameters()).device
    with torch.inference_mode(), inference_autocast(device_, precision):
        metrics = assistant_perplexity(lambda b: causal_loss(model, b), ids, loss,
                                       loaded.cfg.eval.batch_tokens, device_)
    return {**metrics, "dialogues": len(dialogues), "examples": len(ids),
            "turns_skipped_too_long": skipped, "bad_lines": result.bad.total}


EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "translation": evaluate_translation,
    "ner": evaluate_ner,
    "relations": evaluate_relations,
    "mlm": evaluate_mlm,
    "lm": evaluate_lm,
    "chat": evaluate_chat,
}


def evaluate_file(cfg: Config, model_dir: str | Path, data: str | Path, device: str = "auto",
                  precision: str = "auto", bad_lines: str = "skip") -> dict[str, Any]:
    """The metrics of the model in `model_dir` (resolved config `cfg`) on the file `data`
    (translation: with the model's beam and the default hypotheses file)."""
    evaluate = EVALUATORS.get(cfg.task)
    if evaluate is None:
        raise UserError(f"evaluate: unknown task {cfg.task!r} (known: {', '.join(EVALUATORS)})")
    return evaluate(cfg, model_dir, data, device, precision, bad_lines)

"""`trainformer extract MODEL_DIR`: entities (NER model) or the relation (relation model) of each line, as JSON."""

from __future__ import annotations

import json
import sys

from trainformer.cli.common import add_io_args, add_model_verb, add_runtime_args
from trainformer.textio import read_lines


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "extract", help="extract entities or relations from text with a trained model",
        description="Read one text per line (stdin or --input) and write one JSON object per line, "
        "in input order. NER model: {\"text\", \"entities\": [{\"type\", \"text\", \"start\", \"end\"}]} "
        "with character offsets into the line (end exclusive). Relation model: each line marks two "
        "entities with <e1>..</e1> and <e2>..</e2>; output {\"text\", \"relation\", \"score\"}. "
        "Empty lines give empty results; over-long lines are truncated with a warning. A NER model "
        "trained with data.context_window reads consecutive lines together, as one document.",
        model_help="a model/ directory or a run directory (ner or relations)",
    )
    add_io_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def extract_lines(model_dir: str, lines: list[str], source: str, device: str, precision: str) -> list[dict]:
    """One result per line with the model in `model_dir` (its task decides which kind)."""
    from trainformer.errors import UserError
    from trainformer.modeldir import read_model_config

    task = read_model_config(model_dir).task
    if task == "ner":
        from trainformer.inference.loading import load_tagger

        return load_tagger(model_dir, device, precision).extract(lines)
    if task == "relations":
        from trainformer.inference.loading import load_classifier

        return load_classifier(model_dir, device, precision).extract(lines, source)
    raise UserError(f"{model_dir}: a {task!r} model; extract needs a 'ner' or 'relations' model")


def run(args) -> int:
    lines = read_lines(args.input)
    source = "<stdin>" if args.input == "-" else args.input
    results = extract_lines(args.model_dir, lines, source, args.device, args.precision)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for result in results:
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0

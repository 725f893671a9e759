"""`trainformer ensemble MODEL_DIR MODEL_DIR... --out DIR`: combine NER or relation models into one."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ensemble", help="combine NER or relation models (e.g. several seeds) into one that averages them",
        description="Copy two or more trained models of one extraction task (ner or relations) into one "
        "ensemble directory. `evaluate` and `extract` take it like a single model: relations average "
        "the members' label distributions, NER their per-word scores and tag-transition scores. The "
        "members must share one tokenizer and label set: train them with the same data keys and "
        "different seeds (--set train.seed=N).",
    )
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="model/ or run directories")
    p.add_argument("--out", required=True, help="the new ensemble directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.inference.ensemble import build_ensemble

    out = build_ensemble(args.model_dirs, args.out)
    print(f"ensemble of {len(args.model_dirs)} models written to {out}; "
          f"score it with: trainformer evaluate {out} --data FILE")
    return 0

"""`trainformer evaluate MODEL_DIR --data FILE | --split test`: the task's metric on a file
(or, for translation, on the model's own held-out split)."""

from __future__ import annotations

import json

from trainformer.cli.common import add_model_verb, add_runtime_args


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "evaluate", help="score a trained model on a data file (BLEU/chrF, F1, perplexity)",
        description="Score a model on a data file in its task's format. Translation: "
        "sacreBLEU and chrF on detokenised output against every reference of each "
        "source (a source that occurs several times is multi-reference).",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="data file (translation: TSV with a header, e.g. en<TAB>fr)")
    where.add_argument("--split", choices=["valid", "test"],
                       help="translation: the model's own held-out split, rebuilt from its config and the data root")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the model's eval.beam)")
    p.add_argument("--hyps", default=None, help="where to write hypotheses (default: DATA.hyp.txt in the current folder)")
    p.add_argument("--bad-lines", choices=["skip", "error"], default="skip", help="policy for malformed lines")
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.errors import UserError
    from trainformer.modeldir import read_model_config
    from trainformer.tasks.evaluators import evaluate_file, evaluate_translation

    cfg = read_model_config(args.model_dir)
    runtime = dict(device=args.device, precision=args.precision, bad_lines=args.bad_lines)
    if cfg.task == "translation":
        metrics = evaluate_translation(cfg, args.model_dir, args.data, **runtime, beam=args.beam, hyps=args.hyps,
                                       split=args.split)
    elif args.split is not None:
        raise UserError(f"--split: only translation models rebuild their held-out split (this one is "
                        f"{cfg.task}); give --data")
    else:
        metrics = evaluate_file(cfg, args.model_dir, args.data, **runtime)
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
    else:
        for key, value in metrics.items():
            print(f"{key:>16s}: {value}")
    return 0

"""`trainformer evaluate MODEL_DIR --data FILE`: the task's metric on a file."""

from __future__ import annotations

import json
from pathlib import Path

from trainformer.cli.common import add_model_verb, add_runtime_args


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "evaluate", help="score a trained model on a data file (BLEU/chrF, F1, perplexity)",
        description="Score a model on a data file in its task's format. Translation: "
        "sacreBLEU and chrF on detokenised output against every reference of each "
        "source (a source that occurs several times is multi-reference).",
    )
    p.add_argument("--data", required=True, help="data file (translation: TSV with a header, e.g. en<TAB>fr)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the model's eval.beam)")
    p.add_argument("--hyps", default=None, help="where to write hypotheses (default: DATA.hyp.txt in the current folder)")
    p.add_argument("--bad-lines", choices=["skip", "error"], default="skip", help="policy for malformed lines")
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from trainformer.modeldir import read_model_config

    cfg = read_model_config(args.model_dir)
    if cfg.task == "translation":
        metrics = evaluate_translation(args)
    else:
        from trainformer.tasks.evaluators import evaluate_file

        metrics = evaluate_file(cfg, args)
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
    else:
        for key, value in metrics.items():
            print(f"{key:>16s}: {value}")
    return 0


def evaluate_translation(args) -> dict:
    from trainformer.data.readers import read_parallel_tsv
    from trainformer.data.splits import group_references
    from trainformer.errors import UserError
    from trainformer.tasks.loading import load_translator
    from trainformer.tasks.translate_infer import score_translations

    path = Path(args.data)
    if not path.is_file():
        raise UserError(f"--data: file not found: {path}")
    translator = load_translator(args.model_dir, args.device, args.precision)
    cfg = translator.cfg
    result = read_parallel_tsv(path, cfg.data.src_lang, cfg.data.tgt_lang, bad_lines=args.bad_lines)
    if not result.examples:
        raise UserError(f"{path}: no usable sentence pairs")
    pairs = result.examples
    grouped = group_references([p.src for p in pairs], [p.tgt for p in pairs], range(len(pairs)))
    sources, refs = [s for s, _ in grouped], [r for _, r in grouped]
    hyps = [n[0] for n in translator.translate(sources, beam=args.beam or cfg.eval.beam)]
    hyp_path = Path(args.hyps) if args.hyps else Path.cwd() / f"{path.stem}.hyp.txt"
    hyp_path.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    scores = score_translations(hyps, refs)
    return {
        "bleu": scores["bleu"],
        "chrf": scores["chrf"],
        "sources": len(sources),
        "references": len(pairs),
        "bad_lines": result.bad.total,
        "bleu_signature": scores["bleu_signature"],
        "chrf_signature": scores["chrf_signature"],
        "hypotheses": str(hyp_path),
    }

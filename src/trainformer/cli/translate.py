"""`trainformer translate MODEL_DIR`: sentences in (stdin or file), translations out, in order."""

from __future__ import annotations

import sys

from trainformer.cli.common import add_engine_arg, add_io_args, add_model_verb, add_runtime_args
from trainformer.textio import read_lines


def add_parser(sub) -> None:
    p = add_model_verb(
        sub, "translate", help="translate sentences with a trained model",
        description="Translate one sentence per line (stdin or --input) and write one "
        "translation per line, in input order. Empty lines stay empty.",
    )
    add_io_args(p)
    p.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy; default: the model's eval.beam)")
    p.add_argument("--nbest", type=int, default=1, help="write the N best translations, tab-separated")
    p.add_argument("--max-len", type=int, default=None, help="most tokens to generate per sentence")
    p.add_argument("--sampling", action="store_true", help="sample instead of beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arg(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def _check(args) -> None:
    from trainformer.errors import UserError

    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam: expected an integer >= 1, got {args.beam}")
    if args.nbest < 1 or (args.beam is not None and args.nbest > args.beam and not args.sampling):
        raise UserError(f"--nbest: expected 1 <= nbest <= beam, got {args.nbest}")
    if args.max_len is not None and args.max_len < 1:
        raise UserError(f"--max-len: expected an integer >= 1, got {args.max_len}")
    if not 0.0 < args.top_p <= 1.0 or args.temperature <= 0:
        raise UserError("--top-p must be in (0, 1] and --temperature > 0")


def _load(args):
    """The translator of --engine: ours on a model dir, or CTranslate2's on its export."""
    from trainformer.interop import ct2

    if args.engine == "ctranslate2":
        return ct2.load_ct2_translator(args.model_dir, args.device,
                                       compute_type=ct2.compute_type_of(args.precision))
    if ct2.is_ct2_dir(args.model_dir):
        from trainformer.errors import UserError

        raise UserError(f"{args.model_dir}: a CTranslate2 export; pass --engine ctranslate2")
    from trainformer.inference.loading import load_translator

    return load_translator(args.model_dir, args.device, args.precision)


def run(args) -> int:
    _check(args)
    lines = read_lines(args.input)
    translator = _load(args)
    beam = args.beam or translator.cfg.eval.beam
    sampling = None
    if args.sampling:
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    results = translator.translate(lines, beam=beam, nbest=args.nbest, max_len=args.max_len, sampling=sampling)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        for nbest in results:
            out.write("\t".join(nbest) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0

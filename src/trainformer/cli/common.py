"""Argument helpers shared by the verbs."""

from __future__ import annotations


def add_overrides(p) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")


def add_model_verb(sub, name: str, help: str, description: str,
                   model_help: str = "a model/ directory or a run directory"):
    """A verb that works on a trained model dir: its parser with the MODEL_DIR positional."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("model_dir", help=model_help)
    return p


def add_io_args(p) -> None:
    """--input/--output: one text per line, '-' for stdin/stdout."""
    p.add_argument("--input", "-i", default="-", help="input file (default: stdin)")
    p.add_argument("--output", "-o", default="-", help="output file (default: stdout)")


def add_runtime_args(p) -> None:
    """--device and --precision of an inference command."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where this device runs it fast, else fp32 (CPU decoding: fp32 "
                        "for steps of fewer than 16 rows, batch x beam, where bf16 is slower)")


def require_positive(parser, args, *names: str) -> None:
    """Exit through `parser.error` (one line, status 2) if an integer option ``--NAME`` is below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {value}")


def add_engine_arg(p) -> None:
    """--engine of the decoding verbs: our PyTorch models, or a CTranslate2 export of them."""
    p.add_argument("--engine", choices=["torch", "ctranslate2"], default="torch",
                   help="torch (default), or ctranslate2: MODEL_DIR is then a dir written by "
                   "'trainformer export MODEL_DIR --to ctranslate2' (--precision picks its compute type)")

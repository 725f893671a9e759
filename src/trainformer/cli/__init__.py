"""The `trainformer` command: one verb per job.

Each verb lives in its own module with ``add_parser(subparsers)`` (which
sets ``func``). A `UserError` becomes a one-line message and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from trainformer.errors import UserError

# module name -> verb, in the order --help lists them
COMMANDS = [
    "train", "evaluate", "translate", "extract", "chat", "generate",
    "prune", "quantize", "ensemble", "export", "serve", "bench", "plot", "recipes",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trainformer",
        description="Train Transformer models efficiently, and put them to work.",
        epilog="Run 'trainformer COMMAND --help' for a command's options. "
        "Built-in recipes: 'trainformer recipes'.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"trainformer.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"trainformer.cli.{name}":
                continue  # verb not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TRAINFORMER_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"trainformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading user text for the inference verbs: clear errors, nothing silently lost."""

from __future__ import annotations

import sys
from pathlib import Path

from trainformer.errors import DataError


def read_lines(source: str | Path | None) -> list[str]:
    """Lines of a UTF-8 file (or stdin when `source` is None or "-"), without line ends.

    Invalid UTF-8 is an error naming the line (``FILE:LINE``); a final line
    without a newline is kept; empty lines are kept (they map to empty outputs).
    """
    if source is None or str(source) == "-":
        name, data = "<stdin>", sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
        name, data = str(path), path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{number}: invalid UTF-8 at byte {e.start} of the line") from None
    return out


def warn(message: str) -> None:
    print(f"trainformer: warning: {message}", file=sys.stderr)

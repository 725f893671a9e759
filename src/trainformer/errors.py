"""Errors that are the user's to fix.

A `UserError` is printed by the CLI as one line (``trainformer: error: ...``)
with exit status 2 and no traceback; anything else is a bug and keeps its
traceback. Raise it with a message that names the file, line or key and what
was expected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in input, configuration or data that the user can fix."""


class ConfigError(UserError):
    """A bad key, type or value in a recipe or a ``--set`` override."""


class DataError(UserError):
    """Missing or malformed data (names the file and, where known, the line)."""


def run_script(main: Callable[[], object], prog: str) -> None:
    """Run a script's `main()`; a `UserError` ends it with one line ``prog: message`` (exit status 1)."""
    try:
        main()
    except UserError as e:
        sys.exit(f"{prog}: {e}")

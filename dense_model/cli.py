"""What the command-line tools do with a user's mistake (a missing file, a bad value): one line
``error: ...`` on stderr and exit status 2 (the house's status for bad input, as the launcher and
convert_token_files.py), no traceback; anything else is a bug and shows one."""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError)


def run_reporting_errors(body: Callable[[], int | None]) -> int:
    """``body()``'s exit status (None = 0), or 2 after one ``error:`` line if it raised a user error."""
    try:
        return body() or 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

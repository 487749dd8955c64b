"""Command-line entry helper: a UserError becomes its one sentence on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from fed_app.errors import UserError


def exit_on_user_error(main: Callable[[], int | None]) -> None:
    """Run `main`; exit with its status, or with 2 and the error's sentence on a UserError."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

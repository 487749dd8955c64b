"""Command-line entry helpers: a UserError becomes its one sentence on stderr and exit status 2; SIGTERM and
SIGHUP (kill, a batch scheduler's time limit, a closed terminal) unwind the command like Ctrl-C does, so that
what it started (a Flower federation, a claim) is stopped and released on the way out."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

from fed_app.errors import UserError


class Stopped(KeyboardInterrupt):
    """The command was asked to stop by a signal; raised in the main thread, unwinding every `with`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def die_with_parent() -> None:
    """When started by a runner (env FEDIT_PARENT_PID), be sent SIGTERM when it dies, even by SIGKILL (Linux)."""
    parent = os.environ.get("FEDIT_PARENT_PID")
    if not parent:
        return
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the runner died before prctl
        raise Stopped(signal.SIGTERM)


def exit_on_user_error(main: Callable[[], int | None]) -> None:
    """Run `main`; exit with its status, with 2 and the error's sentence on a UserError, or with 128 + the
    signal's number when SIGTERM, SIGHUP or SIGINT stopped it (everything it started stopped first)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
    try:
        die_with_parent()
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signum)
    sys.exit(code or 0)

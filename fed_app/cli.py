"""Command-line entry helper: user errors become one sentence on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from fed_app.config import ConfigError
from fed_app.data import DataError
from fed_app.model import ModelWeightsError

USER_ERRORS = (ConfigError, DataError, ModelWeightsError)  # plus SimulationError, added lazily below


def exit_on_user_error(main: Callable[[], None]) -> None:
    from fed_app.simulation import SimulationError

    try:
        main()
    except (*USER_ERRORS, SimulationError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

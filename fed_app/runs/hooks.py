"""Side concerns of a run, as hooks on the one run loop (run_loop.run_steps): each is called at fixed points
and none of them changes what the run computes. A tracker (trackers.py) is one; so are the curves drawn at the
end, a method's clean-up of its clients' state, and the profile of where each round's time went
(profile.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fed_app.runs.plots import plot_curves
from fed_app.runs.rundir import RunDir


class RunHook:
    """Every method is optional; run_steps calls them in this order."""

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """Before the first step: the rows kept from before a stop."""

    def amend(self, row: dict[str, Any]) -> None:
        """A step's row, before it is written: add fields to it (a profile's seconds by phase)."""

    def log(self, row: dict[str, Any]) -> None:
        """A step's row, once written."""

    def finish(self, run_dir: RunDir) -> None:
        """After the last step, before DONE (or DIVERGED)."""

    def close(self) -> None:
        """On the way out, finished or not."""


class Curves(RunHook):
    """curves.png of the run's rows, over `x` (round or epoch), drawn when it ends."""

    def __init__(self, x: str, title: str):
        self.x, self.title = x, title

    def finish(self, run_dir: RunDir) -> None:
        plot_curves(run_dir.rows(), run_dir.path / "curves.png", x=self.x, title=self.title)


class AtFinish(RunHook):
    """Calls `action` when the run ends (e.g. a method letting go of its clients' state: no resume needs it)."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def finish(self, run_dir: RunDir) -> None:
        self.action()

"""Where a federated run's time goes, for `bench round --profile` and `bench grid`, when FEDIT_PROFILE is set in
the ServerApp's environment: each row gets the round's seconds by phase (`RoundProfile`, a run-loop hook), and
profile.json the moment the ServerApp reached each stage of the run (`Marks`)."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

from fed_app.runs.hooks import RunHook
from fed_app.runs.rundir import RunDir

PROFILE = "FEDIT_PROFILE"  # set (to 1) in the environment: rows get each round's seconds by phase


def profiling() -> bool:
    return bool(os.environ.get(PROFILE))


class Marks(dict):
    """When the ServerApp reached each stage of a run, and each round ended ('round_ended', a list), in epoch
    seconds, comparable across processes; written to the run's profile.json when profiling."""

    def mark(self, stage: str) -> None:
        self[stage] = time.time()

    def save(self, run_dir: RunDir) -> None:
        if profiling():
            (run_dir.path / "profile.json").write_text(json.dumps(self))


class Timed(Protocol):
    phases: dict[str, float]  # the last round's seconds by phase ('time_send', 'time_client_train', ...)
    evaluate_seconds: float | None  # seconds the last evaluation took (None: the row holds none)


class RoundProfile(RunHook):
    """Adds to each row the seconds of its round by phase (`profile_<phase>`) and of the server's evaluation
    (`profile_evaluate`), and marks when each round ended (the CPU sampler's round boundaries)."""

    def __init__(self, rounds: Timed, marks: Marks, key: str = "round"):
        self.rounds, self.marks, self.key = rounds, marks, key

    def amend(self, row: dict[str, Any]) -> None:
        if row[self.key] > 0:
            row.update({f"profile_{k[5:]}": float(v) for k, v in self.rounds.phases.items()})
            self.marks.setdefault("round_ended", []).append(time.time())
        if self.rounds.evaluate_seconds is not None:
            row["profile_evaluate"] = self.rounds.evaluate_seconds

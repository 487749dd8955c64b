"""The one shape of a resumable run, centralized or federated: restore the last checkpoint or take step 0,
then each step is run, recorded as a row and checkpointed on schedule, then DONE (or DIVERGED, when the
divergence guard stops it). What a step is (an epoch,
a FedAvg round) belongs to the caller's `Steps`; when to restore, record and checkpoint belongs here. Side
concerns (tracking, curves, profiles, a method's clean-up) are hooks (hooks.py) called at fixed points."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from fed_app.runs import claims
from fed_app.config import RunConfig
from fed_app.runs.divergence import divergence
from fed_app.errors import UserError
from fed_app.runs.rundir import RunDir
from fed_app.runs.hooks import RunHook
from fed_app.runs.trackers import open_tracker

log = logging.getLogger(__name__)


class Steps(Protocol):
    key: str  # "epoch" or "round": the rows' counter, the checkpoint's, and the log's
    total: int  # the last step; step 0 is the starting point

    def step_zero(self) -> dict[str, Any]:
        """A fresh run's starting point (step 0, calibration, masks saved): row 0's fields."""

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Put back what `state()` saved in `checkpoint`."""

    def step(self, i: int) -> dict[str, Any]:
        """Step i of 1..total: its row's fields."""

    def evaluate(self, i: int) -> dict[str, Any]:
        """The metrics of the model after step i that its row holds (validation and test on their schedules)."""

    def checkpoints(self, i: int) -> bool:
        """Whether step i is checkpointed (the last step always is)."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the counter, the wall time and the config."""


@contextlib.contextmanager
def claimed_run(cfg: RunConfig, group: str, claim_token: str = "") -> Iterator[tuple[RunDir, claims.Claim]]:
    """The run's folder, claimed by this process (or adopted: the launching command's `claim_token`) and bound to
    `cfg`; the claim is released on leaving. A run that a live command holds is refused in one sentence."""
    run_dir = RunDir.for_config(cfg, group)
    claim = claims.take(run_dir.path, claim_token)
    if claim is None:
        raise claims.ClaimedError(claims.busy_message(run_dir.path))
    try:
        run_dir.bind(cfg)
        yield run_dir, claim
    finally:
        claim.release()


def run_steps(cfg: RunConfig, run_dir: RunDir, steps: Steps, guard: Callable[[], None] = lambda: None,
              hooks: Sequence[RunHook] = ()) -> RunDir:
    """Restore or step 0, then steps start+1..total, each one a row and, on schedule, a checkpoint; DONE. A run
    whose rows show divergence (fed_app/runs/divergence.py) stops at that row, marked DIVERGED instead.
    `guard` runs before anything is written (the claim's check: a run whose command is gone stops). The run's
    tracker comes first among the `hooks`."""
    key = steps.key
    checkpoint = run_dir.resume(key)
    rows = run_dir.rows()  # kept from before a stop: the guard looks back over them
    hooks = [open_tracker(cfg, run_dir.path, key), *hooks]
    for hook in hooks:
        hook.catch_up(rows)  # e.g. rows the tracker does not hold yet
    t0 = time.perf_counter()
    try:
        if checkpoint is None:
            started = time.perf_counter()
            rows.append(_record(cfg, run_dir, steps, 0, steps.step_zero(), started, t0, guard, hooks, rows))
            start = 0
        else:
            steps.restore(checkpoint)
            start = checkpoint[key]
            t0 -= checkpoint.get("wall_time", 0.0)  # wall time counts on from where the run stopped
        for i in range(start + 1, steps.total + 1):
            started = time.perf_counter()
            rows.append(_record(cfg, run_dir, steps, i, steps.step(i), started, t0, guard, hooks, rows))
            if "diverged" in rows[-1]:
                break
        guard()
        for hook in hooks:
            hook.finish(run_dir)
        if "diverged" in rows[-1]:
            run_dir.mark_diverged(rows[-1]["diverged"])
            log.warning("%s", diverged_message(run_dir))
        else:
            run_dir.mark_done()
    finally:
        for hook in hooks:
            hook.close()
    return run_dir


class DivergedError(UserError, RuntimeError):
    """A command's run was stopped by the divergence guard: its one sentence (the runner lists it apart)."""


def diverged_message(run_dir: RunDir) -> str:
    """The one sentence of a run the divergence guard stopped."""
    return (f"run {run_dir.path.name} diverged ({run_dir.diverged}); it is marked DIVERGED, not DONE, and loses "
            f"every selection; lower its lr (or delete its folder to run it again).")


def _record(cfg: RunConfig, run_dir: RunDir, steps: Steps, i: int, fields: dict[str, Any], started: float,
            t0: float, guard: Callable[[], None], hooks: list[RunHook], before: list[dict[str, Any]]) -> dict[str, Any]:
    row = {steps.key: i, **fields, **steps.evaluate(i)}
    for hook in hooks:
        hook.amend(row)
    row[f"{steps.key}_time"] = time.perf_counter() - started
    row["wall_time"] = time.perf_counter() - t0
    if i > 0 and "diverged" not in row and (reason := divergence([*before, row], steps.key, final=i == steps.total)):
        row["diverged"] = reason
    guard()
    run_dir.append_row(row)
    for hook in hooks:
        hook.log(row)
    if i == 0 or i == steps.total or steps.checkpoints(i):
        run_dir.save_checkpoint({steps.key: i, **steps.state(), "wall_time": row["wall_time"],
                                 "config": cfg.to_dict()})
    log.info("%s", progress_line(steps.key, i, steps.total, row))
    return row


def progress_line(key: str, i: int, total: int, row: dict[str, Any]) -> str:
    """`round 3/40  train_loss 2.1034  val_accuracy 0.4120`: the step and the metrics its row holds."""
    shown = [f"{name} {row[name]:.4f}" for name in ("train_loss", "val_accuracy", "test_accuracy")
             if isinstance(row.get(name), float)]
    return "  ".join([f"{key} {i}/{total}", *shown])

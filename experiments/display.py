"""What the runner shows: each run's status, the plan of a command (what is done, what resumes from which
checkpoint, what starts, what is still to be tuned), the live display's columns, and the watch that turns a
run's new rows into log lines and its line of the display."""

from __future__ import annotations

import json
import logging
import stat
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from experiments.manifest import Manifest, Run, TuningPending
from fed_app.runs.rundir import rows_reach
from fed_app.runs.run_loop import progress_line

log = logging.getLogger(__name__)


def status(run: Run) -> str:
    """done, diverged (stopped by the divergence guard: finished, never rerun), partial or new."""
    path = Path(run.cfg.run_dir)
    key, total = ("epoch", run.cfg.epochs) if run.kind == "centralized" else ("round", run.cfg.total_rounds)
    if (path / "DONE").exists() and rows_reach(path / "rows.jsonl", key, total):  # else rows to redo: partial
        return "done"
    if (path / "DIVERGED").exists():
        return "diverged"
    return "partial" if (path / "checkpoint.pt").exists() else "new"


def print_plan(manifest: Manifest, runs: list[Run], console: Console,
               pending: list[TuningPending] | None = None) -> None:
    """The runs with their status; under them, the values still to be tuned and the command that tunes them."""
    table = Table(title=f"{manifest.name}: {len(runs)} runs")
    for column in ("run id", "status", "grid values"):
        table.add_column(column)
    for run in runs:
        table.add_row(run.run_id, status(run), run.label(list(manifest.axes)))
    console.print(table)
    for tuning in {(p.manifest, tuple(p.keys)): p for p in pending or ()}.values():
        console.print(f"pending: {', '.join(tuning.keys)} from the best of manifest {tuning.manifest}, not tuned yet; "
                      f"{tuning.command}. Until then the runs above show the base values, and their ids change "
                      f"once tuned.", soft_wrap=True)


def display_columns(width: int) -> tuple:
    """A running run's label (cut with an ellipsis, never wrapped), its bar, round or epoch of total, time left
    and latest validation accuracy, in `width` columns: the label gives way, the rest stays visible."""
    fixed = 16 + 9 + 8 + 10 + 4  # bar, '123/200', '0:12:34', 'val 45.3%', the spaces between
    label = Column(width=max(12, width - fixed), no_wrap=True, overflow="ellipsis")
    return (TextColumn("{task.description}", table_column=label), BarColumn(bar_width=16),
            MofNCompleteColumn(table_column=Column(width=9, no_wrap=True)), TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[metric]}", table_column=Column(width=10, no_wrap=True)))


def say_plan(manifest: Manifest, runs: list[Run]) -> None:
    """What this command will do: how many runs are done already, which resume from which checkpoint, and how
    many start."""
    states = {run.run_id: status(run) for run in runs}
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "diverged", "partial", "new")}
    log.info("%s: %d runs: %d done, %d diverged, %d to resume, %d to start", manifest.name, len(runs),
             counts["done"], counts["diverged"], counts["partial"], counts["new"])
    axes = list(manifest.axes)
    for run in runs:
        if states[run.run_id] == "partial":
            log.info("%s %s: resumes after %s", run.run_id, run.label(axes), checkpoint_step(run))


def checkpoint_step(run: Run) -> str:
    """'round 6' (or 'epoch 2') of the run's last checkpoint, read without loading its tensors."""
    import torch

    key = "epoch" if run.kind == "centralized" else "round"
    path = Path(run.cfg.run_dir) / "checkpoint.pt"
    try:
        if not stat.S_ISREG(path.lstat().st_mode):  # a FIFO planted in a shared folder would block the plan
            raise OSError(f"{path} is not a regular file")
        checkpoint = torch.load(path, map_location="cpu", mmap=True,
                                weights_only=True)  # tensors and plain values only: a pickle may run code
        return f"{key} {checkpoint[key]}"
    except Exception:  # damaged or unreadable: the run itself says what it does with it; here only a label
        return "its last readable checkpoint"


def watch(run: Run, bar: Progress, task, stop: threading.Event) -> None:
    """Show the run's progress and latest accuracy from its rows.jsonl, and log each new row once."""
    rows_file = Path(run.cfg.run_dir) / "rows.jsonl"
    key = "epoch" if run.kind == "centralized" else "round"
    total = run.cfg.epochs if run.kind == "centralized" else run.cfg.total_rounds
    seen = len(_rows(rows_file))  # rows of an earlier session were logged then
    while True:
        finished = stop.wait(1.0)
        rows = _rows(rows_file)
        seen = min(seen, len(rows))  # a resume drops the rows after its checkpoint
        for row in rows[seen:]:
            log.info("%s %s", run.run_id, progress_line(key, row[key], total, row))
        seen = len(rows)
        if rows:
            accuracy = next((r["val_accuracy"] for r in reversed(rows) if r.get("val_accuracy") is not None), None)
            shown = f"val {100 * accuracy:.1f}%" if accuracy is not None else ""
            bar.update(task, completed=rows[-1][key], metric=shown)
        if finished:
            return


def _rows(rows_file: Path) -> list[dict]:
    """The rows written so far; a line still being written ends them (an unreadable file: none yet)."""
    try:
        lines = rows_file.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in filter(str.strip, lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows

"""The runner: every run of a manifest, one per device slot at a time (`--devices 0,1,cpu`); each run claimed
first (fed_app/runs/claims.py), so runners on one machine or on machines sharing the results split the manifest
between them and never train a run twice; done runs skipped, partial ones resumed, failures listed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from experiments.manifest import Manifest, Run, TuningPending
from experiments.slots import Slot
from fed_app.runs import claims
from fed_app.errors import UserError
from fed_app.launch import preflight
from fed_app.local.local_federation import LocalFederation, run_config_arg
from fed_app.local.session import Session
from fed_app.runs.run_loop import progress_line

log = logging.getLogger(__name__)


class RunFailedError(UserError, RuntimeError):
    """A centralized run's process failed; its one sentence."""


def status(run: Run) -> str:
    """done, diverged (stopped by the divergence guard: finished, never rerun), partial or new."""
    path = Path(run.cfg.run_dir)
    if (path / "DONE").exists():
        return "done"
    if (path / "DIVERGED").exists():
        return "diverged"
    return "partial" if (path / "checkpoint.pt").exists() else "new"


def select(manifest: Manifest, only: str | None) -> list[Run]:
    """All runs, or those whose id or grid label contains `only`."""
    if not only:
        return list(manifest.runs)
    return [r for r in manifest.runs if only in r.run_id or only in r.label(list(manifest.axes))]


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


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)  # runs that failed here
    diverged: list[str] = field(default_factory=list)  # runs the divergence guard stopped (here or before)
    elsewhere: list[str] = field(default_factory=list)  # runs another live command holds


@dataclass
class Runner:
    """What the slots of one runner share: the manifest's queue of runs, the display, what is known."""

    manifest: Manifest
    results: Path
    cpus: int
    gpus: float
    bar: Progress
    overall: Any  # the display's task id for the whole manifest
    queue: list[Run]
    outcome: Outcome = field(default_factory=Outcome)
    checked: set = field(default_factory=set)  # data and model sources the preflight has checked
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def run_manifest(manifest: Manifest, runs: list[Run], results: Path, cpus: int = 1, gpus: float = 0.0,
                 slots: list[Slot] | None = None) -> Outcome:
    """Run what is not done yet, one run per slot at a time; what failed and what others are running."""
    slots = slots or [Slot("auto")]
    console = Console()
    claims.writable(results / manifest.name)  # one sentence before any run if the results cannot be written
    shutil.copyfile(manifest.path, results / manifest.name / "manifest.yaml")  # the report reads its axes
    # In a terminal, a live bar per running run above the log; piped or in CI, one plain line per event.
    live = console.is_terminal
    handler = (RichHandler(console=console, show_path=False, show_level=False) if live
               else logging.StreamHandler(sys.stdout))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    _say_plan(manifest, runs)
    with Progress(*display_columns(console.width), console=console, disable=not live) as bar:
        runner = Runner(manifest, results, cpus, gpus, bar,
                        bar.add_task(f"[bold]{manifest.name}", total=len(runs), metric=""), list(runs))
        workers = [SlotWorker(runner, slot, slot.name if len(slots) > 1 else "") for slot in slots]
        for worker in workers:
            worker.thread.start()
        try:
            while not all(w.finished.is_set() for w in workers):
                time.sleep(0.2)  # the main thread stays free to take SIGTERM/SIGHUP/Ctrl-C
        except KeyboardInterrupt:
            runner.stop.set()
            for w in workers:
                w.halt()
            for w in workers:  # not Thread.join: a join that a signal interrupted may return early afterwards
                w.finished.wait()
            raise
    return runner.outcome


def display_columns(width: int) -> tuple:
    """A running run's label (cut with an ellipsis, never wrapped), its bar, round or epoch of total, time left
    and latest validation accuracy, in `width` columns: the label gives way, the rest stays visible."""
    fixed = 16 + 9 + 8 + 10 + 4  # bar, '123/200', '0:12:34', 'val 45.3%', the spaces between
    label = Column(width=max(12, width - fixed), no_wrap=True, overflow="ellipsis")
    return (TextColumn("{task.description}", table_column=label), BarColumn(bar_width=16),
            MofNCompleteColumn(table_column=Column(width=9, no_wrap=True)), TimeRemainingColumn(compact=True),
            TextColumn("{task.fields[metric]}", table_column=Column(width=10, no_wrap=True)))


def _say_plan(manifest: Manifest, runs: list[Run]) -> None:
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
    try:
        checkpoint = torch.load(Path(run.cfg.run_dir) / "checkpoint.pt", map_location="cpu", mmap=True,
                                weights_only=False)
        return f"{key} {checkpoint[key]}"
    except Exception:  # cut short: the run itself falls back to the checkpoint before it, and says so
        return "its last readable checkpoint"


class SlotWorker:
    """One slot's thread: takes the next run it can claim, runs it pinned to its device, releases it."""

    def __init__(self, runner: Runner, slot: Slot, label: str):
        self.runner, self.slot, self.label = runner, slot, label
        self.cpus, self.gpus = runner.cpus, 0.0 if slot.name == "cpu" else runner.gpus
        self.federation: LocalFederation | None = None
        self.session: Session | None = None
        self.child: subprocess.Popen | None = None
        self.finished = threading.Event()  # set once its runs are over and their claims released
        self.thread = threading.Thread(target=self._loop, daemon=True, name=f"slot-{slot.name}")

    def halt(self) -> None:
        """Stop what this slot started (the runner was told to stop)."""
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
        if self.federation is not None:
            self.federation.stop()

    def _next(self) -> Run | None:
        with self.runner.lock:
            return self.runner.queue.pop(0) if self.runner.queue and not self.runner.stop.is_set() else None

    def _loop(self) -> None:
        try:
            while (run := self._next()) is not None:
                self._one(run)
        finally:
            if self.session is not None:
                self.session.close()
            if self.federation is not None:
                self.federation.close()
            self.finished.set()

    def _finished(self, run: Run) -> bool:
        """Whether nothing is left to run of `run` (a diverged one counted as such)."""
        state = status(run)
        if state == "diverged":
            with self.runner.lock:
                self.runner.outcome.diverged.append(run.run_id)
        return state in ("done", "diverged")

    def _one(self, run: Run) -> None:
        if self._finished(run):
            self.runner.bar.advance(self.runner.overall)
            return
        claim = claims.take(Path(run.cfg.run_dir))
        if claim is None:
            holder = claims.holder(Path(run.cfg.run_dir))
            log.info("%s is being run by %s; skipped here", run.run_id, holder.describe() if holder else "another")
            with self.runner.lock:
                self.runner.outcome.elsewhere.append(run.run_id)
            self.runner.bar.advance(self.runner.overall)
            return
        with claim:
            if self._finished(run):  # finished by another runner between the look and the claim
                self.runner.bar.advance(self.runner.overall)
                return
            self._claimed(run, run.cfg, claim.token)
            if status(run) == "diverged":
                log.warning("run %s diverged: %s", run.run_id, (Path(run.cfg.run_dir) / "DIVERGED").read_text())
                with self.runner.lock:
                    self.runner.outcome.diverged.append(run.run_id)
        self.runner.bar.advance(self.runner.overall)

    def _claimed(self, run: Run, cfg, claim_token: str) -> None:
        label = run.label(list(self.runner.manifest.axes))
        prefix = f"[{self.label}] " if self.label else ""
        steps = cfg.epochs if run.kind == "centralized" else cfg.total_rounds
        log.info("%s%s %s: %s", prefix, run.run_id, label, "resumes" if status(run) == "partial" else "starts")
        task = self.runner.bar.add_task(f"{prefix}{label}", total=steps, metric="")
        done = threading.Event()
        watcher = threading.Thread(target=_watch, args=(run, self.runner.bar, task, done), daemon=True)
        watcher.start()
        try:
            if run.kind == "centralized":
                self._centralized(cfg, claim_token)
            else:
                self._federated(cfg, claim_token)
        except (UserError, subprocess.SubprocessError) as err:
            if not self.runner.stop.is_set():
                log.error("run %s failed: %s", run.run_id, str(err).splitlines()[0])
                with self.runner.lock:
                    self.runner.outcome.failed.append(run.run_id)
        finally:
            done.set()
            watcher.join()
            self.runner.bar.remove_task(task)

    def _centralized(self, cfg, claim_token: str) -> None:
        """In its own process, pinned to the slot's device, adopting the runner's claim; its one-sentence error
        if it fails."""
        cmd = [sys.executable, "-m", "fed_app.centralized", "--run-config", run_config_arg(cfg, claim_token=claim_token)]
        env = {**os.environ, **self.slot.env, "FEDIT_PARENT_PID": str(os.getpid())}  # it dies with the runner
        self.child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        out, err = self.child.communicate()
        (Path(cfg.run_dir) / "run.log").write_text(out + err)
        diverged = (Path(cfg.run_dir) / "DIVERGED").exists()  # an outcome of the run, not a failure
        if self.child.returncode != 0 and not diverged and not self.runner.stop.is_set():
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            raise RunFailedError(lines[-1][len("error: "):] if lines else f"exit {self.child.returncode}: {err[-500:]}")

    def _federated(self, cfg, claim_token: str) -> None:
        source = (cfg.dataset, cfg.data_root, cfg.model, cfg.model_weights)
        if source not in self.runner.checked:
            preflight(cfg)  # data and model once per source, before Flower starts
            with self.runner.lock:
                self.runner.checked.add(source)
        if self.federation is None:  # this slot's own federation (FLWR_HOME, ports, device) and session
            self.federation = LocalFederation(self.runner.results / self.runner.manifest.name / ".flwr", self.slot.env)
            cores = self.slot.threads or None  # a CPU slot's Ray gets its share of the cores, not all of them
            self.session = Session(self.federation, cpus=min(self.cpus, cores or self.cpus), gpus=self.gpus,
                                   total_cpus=cores)
        if self.session.starts_for(cfg):
            log.info("starting a Flower simulation of %d nodes for %s (its first round takes a minute or so)",
                     cfg.num_clients, cfg.run_id())
        output = self.session.run(cfg, claim_token)  # one simulation runs the slot's runs in turn
        (Path(cfg.run_dir) / "run.log").write_text(output)


def _watch(run: Run, bar: Progress, task, stop: threading.Event) -> None:
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

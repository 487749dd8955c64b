"""The runner: every run of a manifest, one per device slot at a time (`--devices 0,1,cpu`); each run claimed
first (fed_app/runs/claims.py), so runners on one machine or on machines sharing the results split the manifest
between them and never train a run twice; done runs skipped, partial ones resumed, failures listed."""

from __future__ import annotations

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
from rich.progress import Progress

from experiments.display import display_columns, say_plan, status, watch
from experiments.manifest import Manifest, Run
from experiments.slots import Slot
from fed_app.runs import claims
from fed_app.errors import UserError
from fed_app.launch import preflight
from fed_app.local.local_federation import LocalFederation, run_config_arg
from fed_app.local.session import Session

log = logging.getLogger(__name__)


class RunFailedError(UserError, RuntimeError):
    """A centralized run's process failed; its one sentence."""


def select(manifest: Manifest, only: str | None) -> list[Run]:
    """All runs, or those whose id or grid label contains `only`."""
    if not only:
        return list(manifest.runs)
    return [r for r in manifest.runs if only in r.run_id or only in r.label(list(manifest.axes))]


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
    say_plan(manifest, runs)
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
        watcher = threading.Thread(target=watch, args=(run, self.runner.bar, task, done), daemon=True)
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

"""The runner: every run of a manifest in order; done runs skipped, partial ones resumed, failures listed."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from experiments.manifest import Manifest, Run
from fed_app import centralized
from fed_app.errors import UserError
from fed_app.launch import preflight
from fed_app.local_federation import LocalFederation

log = logging.getLogger(__name__)


def status(run: Run) -> str:
    path = Path(run.cfg.run_dir)
    if (path / "DONE").exists():
        return "done"
    return "partial" if (path / "checkpoint.pt").exists() else "new"


def select(manifest: Manifest, only: str | None) -> list[Run]:
    """All runs, or those whose id or grid label contains `only`."""
    if not only:
        return list(manifest.runs)
    return [r for r in manifest.runs if only in r.run_id or only in r.label(list(manifest.axes))]


def print_plan(manifest: Manifest, runs: list[Run], console: Console) -> None:
    table = Table(title=f"{manifest.name}: {len(runs)} runs")
    for column in ("run id", "status", "grid values"):
        table.add_column(column)
    for run in runs:
        table.add_row(run.run_id, status(run), run.label(list(manifest.axes)))
    console.print(table)


def run_manifest(manifest: Manifest, runs: list[Run], results: Path, cpus: int = 1, gpus: float = 0.0) -> list[str]:
    """Run what is not done yet; the ids of the runs that failed (the others went on)."""
    console = Console()
    (results / manifest.name).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manifest.path, results / manifest.name / "manifest.yaml")  # the report reads its axes
    logging.basicConfig(level=logging.INFO, handlers=[RichHandler(console=console, show_path=False)], force=True)
    failed, checked = [], set()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with LocalFederation(results / manifest.name / ".flwr") as sim, Progress(*columns, console=console) as bar:
        overall = bar.add_task(f"[bold]{manifest.name}", total=len(runs))
        for run in runs:
            if status(run) == "done":
                bar.advance(overall)
                continue
            label = run.label(list(manifest.axes))
            steps = run.cfg.epochs if run.kind == "centralized" else run.cfg.total_rounds
            task = bar.add_task(f"{run.run_id} {label}", total=steps)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(run, bar, task, label, stop), daemon=True)
            watcher.start()
            try:
                source = (run.cfg.dataset, run.cfg.data_root, run.cfg.model, run.cfg.model_weights)
                if run.kind == "federated" and source not in checked:
                    preflight(run.cfg)  # data and model once per source, before Flower starts
                    checked.add(source)
                if run.kind == "centralized":
                    centralized.run(run.cfg)
                else:
                    sim.run(run.cfg, num_supernodes=run.cfg.num_clients, cpus=cpus, gpus=gpus)
            except UserError as err:
                log.error("run %s failed: %s", run.run_id, str(err).splitlines()[0])
                failed.append(run.run_id)
            finally:
                stop.set()
                watcher.join()
                bar.remove_task(task)
            bar.advance(overall)
    return failed


def _watch(run: Run, bar: Progress, task, label: str, stop: threading.Event) -> None:
    """Show the run's progress and latest accuracy from its rows.jsonl, once a second."""
    rows_file = Path(run.cfg.run_dir) / "rows.jsonl"
    key = "epoch" if run.kind == "centralized" else "round"
    while not stop.wait(1.0):
        try:
            rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            continue
        if rows:
            accuracy = next((r["val_accuracy"] for r in reversed(rows) if r.get("val_accuracy") is not None), None)
            shown = f" val {100 * accuracy:.1f}%" if accuracy is not None else ""
            bar.update(task, completed=rows[-1][key], description=f"{run.run_id} {label}{shown}")

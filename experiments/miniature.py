"""The study rehearsed in miniature (`python -m experiments study --miniature`): every shipped manifest in
dependency order (tuning manifests first), on real digits with the tiny ViT, from one pretrained-like backbone
trained first, with the manifests' own grids, seeds, controls and selection rules; FedAvg rounds divided by
ROUNDS, centralized epochs (and step sizes) by EPOCHS; every run in process (the real ServerApp and ClientApp
without Flower's processes: fed_app/in_process.py), two at a time; then each manifest's report and one summary
page. What a researcher runs on a laptop before booking a GPU."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from pathlib import Path
from typing import Any

import yaml

from experiments.manifest import Manifest, Run, load_manifest
from experiments.miniature_summary import write_summary
from experiments.report import write_report
from fed_app.errors import UserError

ROUNDS, EPOCHS = 10, 2  # num-rounds / ROUNDS (200 -> 20), epochs and step sizes / EPOCHS (10 -> 5)
PER_ROUND = 5  # clients a round: num-clients x fraction-train below
CLASSES = 10  # digits: classes-per-client above this is clipped to it (Nc=50 runs as Nc=10)
# The miniature's data, model and federation, over every manifest's base: K=20 clients of ~62 images, 5 a round
BASE = {"dataset": "digits", "model": "vit-tiny-test", "val-size": 200, "device": "cpu", "augment": False,
        "batch-size": 32, "eval-batch-size": 512, "num-clients": 20, "fraction-train": 0.25, "fisher-samples": 16,
        "eval-every": 2, "test-every": 2, "checkpoint-every": 10}
BACKBONE = {"dataset": "digits", "model": "vit-tiny-test", "val-size": 200, "device": "cpu", "augment": False,
            "batch-size": 32, "lr": 0.2, "epochs": 12, "seed": 7}  # the learning tests' pretrained-like backbone


def shrink(raw: dict[str, Any], weights: str) -> dict[str, Any]:
    """A shipped manifest's YAML, miniature: BASE and the backbone's weights over its base, its rounds and epochs
    shrunk, its Nc clipped to the digits' classes; grids, seeds, controls and tuned-from kept."""
    def scaled(key: str, value: Any) -> Any:
        if key == "num-rounds":
            return max(1, round(value / ROUNDS))
        if key in ("epochs", "step-size"):
            return max(1, round(value / EPOCHS))
        if key == "classes-per-client":
            return min(value, CLASSES)
        if key == "num-malicious-clients":  # the study's f of 10 a round, as the same share of 5 (Krum: n >= 2f + 3)
            return round(value * PER_ROUND / 10)
        return value

    base = {k: scaled(k, v) for k, v in (raw.get("base") or {}).items()}
    base.update(BASE, **{"model-weights": weights})
    grids = raw.get("grid") or {}
    grids = [{k: [scaled(k, v) for v in vs] for k, vs in g.items()} for g in (grids if isinstance(grids, list) else [grids])]
    return {**raw, "base": base, "grid": grids}


def order(manifests: dict[str, dict]) -> list[str]:
    """Manifest names with every tuning manifest before the manifests that take values from it."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        spec = manifests[name].get("tuned-from") or []
        for entry in spec if isinstance(spec, list) else [spec]:
            visit(entry["manifest"])
        done.append(name)

    for name in sorted(manifests):
        visit(name)
    return done


def _run_one(run: Run) -> str:
    """One run to its end in this worker process (resumed if it was cut short); its id."""
    import torch

    from fed_app import centralized
    from fed_app.in_process import run_in_process

    torch.set_num_threads(1)
    if run.kind == "centralized":
        centralized.run(run.cfg)
    else:
        run_in_process(run.cfg)
    return run.run_id


def run_manifest_in_process(manifest: Manifest, pool: concurrent.futures.Executor) -> None:
    """Every run of `manifest` not finished yet, on the pool's worker processes (a killed study reruns the same
    command: finished runs are skipped, cut ones resume from their checkpoints)."""
    todo = [r for r in manifest.runs if not any((Path(r.cfg.run_dir) / f).exists() for f in ("DONE", "DIVERGED"))]
    for future in concurrent.futures.as_completed([pool.submit(_run_one, r) for r in todo]):
        future.result()


def backbone(results: Path) -> str:
    """The pretrained-like backbone's weights file (trained once: 12 epochs on digits, about 54% test accuracy)."""
    import torch

    from fed_app import centralized
    from fed_app.config import RunConfig

    path = results / "backbone.pth"
    if not path.exists():
        run = centralized.run(RunConfig.from_run_config({**BACKBONE, "run-dir": str(results / "backbone")}))
        torch.save(run.load_checkpoint()["model"], path)
    return str(path.resolve())


def study(manifests_dir: Path, results: Path, only: list[str] | None = None, workers: int = 2) -> Path:
    """The miniature of every manifest in `manifests_dir` (or those named in `only`, with what they depend on):
    runs, reports, and summary.md in `results`; its path."""
    started = time.time()
    results.mkdir(parents=True, exist_ok=True)
    weights = backbone(results)
    raw = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(Path(manifests_dir).glob("*.yaml"))}
    raw = {n: m for n, m in raw.items() if n != "demo"}  # the demo is already a miniature
    names = order(raw)
    if only:  # those, and the tuning manifests they take values from
        unknown = [n for n in only if n not in raw]
        if unknown:
            raise UserError(f"--only {unknown[0]!r} is not a manifest in {manifests_dir}; pick from {', '.join(raw)}.")
        needed = set().union(*(_closure(raw, name) for name in only))
        names = [n for n in names if n in needed]
    timings = {}
    spawn = multiprocessing.get_context("spawn")  # fresh workers: no torch threads forked from this process
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        for name in names:
            timings[name] = _one_manifest(raw[name], name, weights, results, pool)
            print(f"miniature: {name}: {timings[name][0]} runs in {timings[name][1]:.0f} s", flush=True)
    setting = (f"real digits and the tiny ViT from a backbone pretrained for {BACKBONE['epochs']} epochs; FedAvg "
               f"rounds / {ROUNDS}, centralized epochs and step sizes / {EPOCHS}, Nc clipped to {CLASSES} classes; "
               + ", ".join(f"{k}={v}" for k, v in BASE.items()))
    return write_summary(results, names, timings, time.time() - started, setting)


def _one_manifest(raw: dict, name: str, weights: str, results: Path, pool) -> tuple[int, float]:
    """Shrink, run and report one manifest: (its runs, seconds)."""
    written = results / "manifests" / f"{name}.yaml"
    written.parent.mkdir(exist_ok=True)
    written.write_text(yaml.safe_dump(shrink(raw, weights), sort_keys=False))
    (results / name).mkdir(exist_ok=True)
    (results / name / "manifest.yaml").write_text(written.read_text())  # the report reads its axes and control
    t0 = time.time()
    manifest = load_manifest(written, results)
    run_manifest_in_process(manifest, pool)
    write_report(results / name)
    return len(manifest.runs), time.time() - t0


def _closure(raw: dict[str, dict], name: str) -> set[str]:
    """`name` and every manifest it takes tuned values from, transitively."""
    spec = raw[name].get("tuned-from") or []
    found = {name}
    for entry in spec if isinstance(spec, list) else [spec]:
        found |= _closure(raw, entry["manifest"])
    return found


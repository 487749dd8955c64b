"""Command line: `python -m experiments run MANIFEST`, `report RESULTS_DIR`, `study --miniature`,
`bench fisher|round|data|grid`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from fed_app.errors import CONFIG_FROM, UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a manifest's grid; resumable: rerun the same command after a stop")
    run.add_argument("manifest", type=Path, help="a manifest's YAML file, e.g. experiments/manifests/demo.yaml")
    run.add_argument("--results", type=Path, default=Path("results"),
                     help="where run folders go: <results>/<manifest name>/<run id> (default: results)")
    run.add_argument("--only", default=None, help="only runs whose id or grid values contain this text")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    run.add_argument("--cpus", type=int, default=1, help="CPU cores per Flower client")
    run.add_argument("--gpus", type=float, default=None, help="GPU fraction per client (default 0.1 with CUDA)")
    run.add_argument("--devices", default=None,
                     help="run up to one run per device at once, e.g. 0,1,2,3 (GPU indices) or cpu,cpu; "
                          "default: one run at a time on every visible device")
    report = sub.add_parser("report", help="tables and figures of a results folder (results/<manifest>)")
    report.add_argument("results_dir", type=Path, help="a manifest's results folder, e.g. results/demo")
    report.add_argument("--checkpoint", choices=["final", "best-val"], default="final",
                        help="which step of each run is selected on (validation) and reported (test): the last "
                             "evaluated one, or the best-validation one")
    study = sub.add_parser("study", help="the whole study rehearsed: every shipped manifest, tuning first")
    study.add_argument("--miniature", action="store_true", required=True,
                       help="on real digits with the tiny ViT, rounds and epochs shrunk, in process (a laptop's "
                            "rehearsal before booking a GPU); the only kind there is yet")
    study.add_argument("--results", type=Path, default=Path("results/miniature"),
                       help="where the miniature's manifests write (default: results/miniature)")
    study.add_argument("--only", default=None,
                       help="comma-separated manifest names: only those and the tuning manifests they depend on")
    study.add_argument("--workers", type=int, default=2, help="runs at once, each in a process of its own")
    bench = sub.add_parser("bench", help="benchmarks; print a Markdown table and ratios")
    bench.add_argument("what", choices=["fisher", "round", "data", "grid"],
                       help="fisher: the Fisher diagonal's three ways; round: one FedAvg round against its limit; "
                            "data: data preparation and training rates; grid: a manifest's projected wall time")
    bench.add_argument("--run-config", default="",
                       help="round/data/grid: run-config overrides of the benchmarked setup")
    bench.add_argument("--local-steps", default="4,16", help="round: the J values to measure, comma-separated")
    bench.add_argument("--cpus", type=int, default=1, help="round/grid: CPU cores per Flower client")
    bench.add_argument("--gpus", type=float, default=None,
                       help="round/grid: GPU fraction per Flower client (default 0.1 with CUDA: 10 at a time)")
    bench.add_argument("--manifest", type=Path, default=Path("experiments/manifests/noniid_grid.yaml"),
                       help="grid: the manifest whose wall time to project")
    bench.add_argument("--rounds", type=int, default=12, help="round/grid: rounds per measurement")
    bench.add_argument("--warmup", type=int, default=3, help="round/grid: first rounds left out")
    bench.add_argument("--model", default=None, help="default: vit-small-dino on CUDA, vit-tiny-test on CPU")
    bench.add_argument("--samples", type=int, default=None, help="default: 450 (one client's shard) on CUDA, 128 on CPU")
    bench.add_argument("--chunk", type=int, default=32, help="fisher: samples per vectorized chunk")
    bench.add_argument("--repeats", type=int, default=3,
                       help="fisher: timing repeats; round --against stock: interleaved repetitions")
    bench.add_argument("--profile", action="store_true",
                       help="round: seconds per round by phase (send, client read/train/write, aggregate, ...)")
    bench.add_argument("--against", choices=["stock"], default=None,
                       help="round/grid: also run a stock Flower app of the examples' shape "
                            "(benchmarks/stock_app); round: interleaved with fedit in both transports, "
                            "grid: after fedit in each cost group, beside its fixed cost")
    args = parser.parse_args(argv)
    return {"run": _run, "report": _report, "study": _study, "bench": _bench}[args.command](args)


def _study(args) -> int:
    from experiments.miniature import study

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    print(study(Path("experiments/manifests"), args.results, only, args.workers))
    return 0


def _run(args) -> int:
    from rich.console import Console

    from experiments.manifest import load_manifest
    from experiments.display import print_plan
    from experiments.run import run_manifest, select
    from experiments.slots import parse_devices
    from fed_app.local.local_federation import client_gpus

    os.environ[CONFIG_FROM] = "manifest"  # a fix names the manifest's base, here and in the runs it starts
    pending = [] if args.dry_run else None  # a dry run lists the runs whose tuning has not run yet, with them
    manifest = load_manifest(args.manifest, args.results, pending=pending)
    runs = select(manifest, args.only)
    if args.dry_run:
        print_plan(manifest, runs, Console(), pending)
        return 0
    slots = parse_devices(args.devices, torch.cuda.device_count())
    outcome = run_manifest(manifest, runs, args.results, cpus=args.cpus, gpus=client_gpus(args.gpus), slots=slots)
    if outcome.elsewhere:
        print(f"{len(outcome.elsewhere)} runs were being run by other commands ({', '.join(outcome.elsewhere)}); "
              f"rerun this command once they stop to check on them.", file=sys.stderr)
    if outcome.diverged:
        print(f"{len(outcome.diverged)} runs diverged ({', '.join(outcome.diverged)}): marked DIVERGED, they lose "
              f"every selection and the report lists them apart.", file=sys.stderr)
    if outcome.failed:
        print(f"error: {len(outcome.failed)} runs failed ({', '.join(outcome.failed)}); rerun the same command "
              f"to retry them.", file=sys.stderr)
        return 1
    return 0


def _report(args) -> int:
    from experiments.report import write_report

    print(write_report(args.results_dir, args.checkpoint))
    return 0


def _bench(args) -> int:
    import tempfile

    from experiments.bench.data import bench_data, print_data
    from experiments.bench.fisher import bench_fisher, print_fisher
    from experiments.bench.grid import bench_grid, print_grid
    from experiments.bench.round import bench_profile, bench_round, print_profile, print_round
    from experiments.bench.stock import bench_against_stock, print_against_stock
    from fed_app.config import RunConfig, parse_overrides
    from fed_app.local.local_federation import client_gpus

    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.what in ("round", "grid") and not 1 <= args.warmup <= args.rounds - 3:
        raise UserError(f"--warmup {args.warmup} with --rounds {args.rounds} leaves no steady rounds to time; "
                        f"use 1 <= --warmup <= --rounds - 3 (the last round evaluates and is left out too).")
    if args.what in ("round", "data", "grid"):
        # Timings do not depend on pixel values or weights, so the benchmarks run offline by default: on a
        # GPU the headline shapes (ViT-S/16, CIFAR-100-sized synthetic data); on a CPU the tiny ViT.
        offline = {"dataset": "synthetic", "model-weights": "random"} if device.type == "cuda" else {
            "dataset": "synthetic", "model": "vit-tiny-test", "synthetic-train-size": 5500,
            "synthetic-test-size": 500, "val-size": 500}
        overrides = {**offline, **parse_overrides(args.run_config)}
        cfg = RunConfig.from_run_config(overrides)
        gpus = client_gpus(args.gpus)
        if args.what == "data":
            print_data(bench_data(cfg, batches=20), f"bench data: {cfg.model}, batch {cfg.batch_size}, {name}")
            return 0
        if args.what == "grid":
            from experiments.manifest import load_manifest

            manifest = load_manifest(args.manifest, resolve_tuned=False)  # tuned values do not change the cost
            runs = [RunConfig.from_run_config({**r.cfg.to_run_config(), **overrides}) for r in manifest.runs
                    if r.kind == "federated"]
            with tempfile.TemporaryDirectory(prefix="fedit-bench-") as tmp:
                rows = bench_grid(runs, args.rounds, args.warmup, Path(tmp), args.cpus, gpus,
                                  against_stock=args.against == "stock")
            print_grid(rows, f"bench grid: {manifest.name} ({len(runs)} federated runs), {cfg.model}, {name}, "
                             f"precision {cfg.precision}, s/round = median of rounds {args.warmup + 1}.."
                             f"{args.rounds - 1}")
            return 0
        steps = [int(j) for j in args.local_steps.split(",")]
        slots = int(1 / gpus) if gpus else max(1, (os.cpu_count() or 1) // args.cpus)  # clients training at once
        if args.profile:
            with tempfile.TemporaryDirectory(prefix="fedit-bench-") as tmp:
                rows = bench_profile(cfg, steps, args.rounds, args.warmup, Path(tmp), args.cpus, gpus)
            print_profile(rows, f"bench round --profile: {cfg.model}, K={cfg.num_clients}, C={cfg.fraction_train}, "
                                f"batch {cfg.batch_size}, {name}, seconds per round by phase, median of rounds "
                                f"{args.warmup + 1}..{args.rounds - 1}", slots)
            return 0
        if args.against == "stock":
            with tempfile.TemporaryDirectory(prefix="fedit-bench-") as tmp:
                rows = bench_against_stock(cfg, steps, args.rounds, args.warmup, Path(tmp), args.cpus, gpus,
                                           args.repeats)
            print_against_stock(rows, f"bench round --against stock: {cfg.model}, K={cfg.num_clients}, "
                                      f"C={cfg.fraction_train}, batch {cfg.batch_size}, {name}, precision "
                                      f"{cfg.precision}, s/round = median of rounds {args.warmup + 1}.."
                                      f"{args.rounds - 1}, then median (range) of {args.repeats} interleaved runs")
            print_profile([p for r in rows for p in r["profiles"]], "fedit's rounds by phase (s; median of the "
                          "repetitions; bench round --profile alone runs only these)", slots, cpu=False)
            return 0
        with tempfile.TemporaryDirectory(prefix="fedit-bench-") as tmp:
            rows = bench_round(cfg, steps, args.rounds, args.warmup, Path(tmp), args.cpus, gpus)
        print_round(rows, f"bench round: {cfg.model}, K={cfg.num_clients}, C={cfg.fraction_train}, "
                          f"batch {cfg.batch_size}, {name}, precision {cfg.precision}, "
                          f"median of rounds {args.warmup + 1}..{args.rounds - 1}")
        return 0
    model = args.model or ("vit-small-dino" if device.type == "cuda" else "vit-tiny-test")
    samples = args.samples or (450 if device.type == "cuda" else 128)
    rows = bench_fisher(model, samples, args.chunk, args.repeats, device)
    print_fisher(rows, f"bench fisher: {model}, {samples} samples, chunk {args.chunk}, {name}, fp32")
    return 0


if __name__ == "__main__":
    from fed_app.cli import exit_on_user_error

    exit_on_user_error(main)

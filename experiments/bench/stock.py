"""`bench round --against stock`: fedit's round against a stock Flower app of the examples' shape, interleaved."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from experiments.bench.round import cpu_per_round, print_cpu, round_flower, round_limit
from experiments.bench.timing import print_table, progress, spread
from experiments.cpu import CpuSampler
from fed_app.config import RunConfig


STOCK_APP = Path(__file__).resolve().parents[2] / "benchmarks" / "stock_app"


def round_stock(cfg: RunConfig, rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float) -> dict[str, float]:
    """The stock Flower app (benchmarks/stock_app: Flower's examples' shape, fedit's model and client steps)
    under `flwr run` for `rounds` rounds: median seconds per round over the same rounds as round_flower, and
    the run's fixed cost (wall time of the whole `flwr run` less its rounds)."""
    from fed_app.local.local_federation import LocalFederation, toml_value

    timings = (workdir / f"stock-{time.monotonic_ns()}" / "timings.json").resolve()
    timings.parent.mkdir(parents=True)
    run_cfg = cfg.replace(num_rounds=rounds, rounds_scaling=False)
    text = (f"fedit-config={toml_value(json.dumps(run_cfg.to_run_config()))} "
            f"timings={toml_value(str(timings))}")
    started = time.time()
    with LocalFederation(workdir / ".flwr") as sim, CpuSampler(sim.home) as cpu:
        sim.run(run_cfg, num_supernodes=cfg.num_clients, cpus=cpus, gpus=gpus, app=STOCK_APP, run_config=text)
    finished = time.time()
    ended = json.loads(timings.read_text())["round_ended"]  # round 0 (before training), then after each round
    per_round = [b - a for a, b in zip(ended, ended[1:])]
    steady = statistics.median(per_round[warmup:rounds - 1])
    return {"round": steady, "fixed": finished - started - rounds * steady, "evaluations": 0.0,
            "cpu": cpu_per_round(cpu, ended[warmup:rounds]),
            "stages": {"start-up (SuperLink, simulation, ServerApp)": ended[0] - started,
                       "rounds beyond the steady rate (worker builds in round 1)": sum(per_round) - rounds * steady,
                       "shut-down (simulation, SuperLink)": finished - ended[-1]}}


def bench_against_stock(cfg: RunConfig, local_steps: list[int], rounds: int, warmup: int, workdir: Path, cpus: int,
                        gpus: float, repeats: int) -> list[dict]:
    """Per J (dense): the in-process limit, then `repeats` interleaved repetitions of the stock app, fedit with
    transport='files' and fedit with transport='messages' (in that order, each its own `flwr run`)."""
    rows = []
    for j in local_steps:
        c = cfg.replace(local_steps=j, optimizer="sgdm")
        limit = round_limit(c, rounds, warmup)
        progress(f"J={j}, in-process limit", limit)
        runs: dict[str, list[dict]] = {"stock": [], "files": [], "messages": []}
        for rep in range(1, repeats + 1):
            runs["stock"].append(round_stock(c, rounds, warmup, workdir, cpus, gpus))
            for transport in ("files", "messages"):
                runs[transport].append(round_flower(c.replace(transport=transport), rounds, warmup, workdir, cpus,
                                                    gpus, profile=True))
            for name, reps in runs.items():
                progress(f"J={j}, repetition {rep}, {name}", reps[-1]["round"], reps[-1]["fixed"])
        rows.append({"config": f"J={j}, dense", "limit": limit,
                     **{name: [r["round"] for r in reps] for name, reps in runs.items()},
                     **{f"{name}_fixed": [r["fixed"] for r in reps] for name, reps in runs.items()},
                     **{f"{name}_evaluations": [r["evaluations"] for r in reps] for name, reps in runs.items()},
                     **{f"{name}_stages": [r["stages"] for r in reps] for name, reps in runs.items()},
                     **{f"{name}_cpu": [r["cpu"] for r in reps] for name, reps in runs.items()},
                     "profiles": [{"config": f"J={j}, {t}", "clients": c.clients_per_round,
                                   **{k: statistics.median(r[k] for r in runs[t]) for k in runs[t][0]
                                      if k == "round" or k.startswith("profile_")}}
                                  for t in ("files", "messages")]})
    return rows


def print_against_stock(rows: list[dict], header: str) -> None:
    med = statistics.median
    print_table(header, ["config", "in-process limit", "stock Flower app", "fedit, files", "fedit, messages",
                         "files / stock", "messages / stock", "files / limit"], [
        [r["config"], f"{r['limit']:.3f}", spread(r["stock"]), spread(r["files"]), spread(r["messages"]),
         f"{med(r['files']) / med(r['stock']):.2f}x", f"{med(r['messages']) / med(r['stock']):.2f}x",
         f"{med(r['files']) / r['limit']:.2f}x"] for r in rows])
    print_table("fixed cost per run (s): the wall time of the whole `flwr run` less its rounds at the steady rate "
                "and less the server's evaluations (which the stock app does not do; in brackets)",
                ["config", "stock Flower app", "fedit, files", "fedit, messages"], [
        [r["config"], spread(r["stock_fixed"], 1)] + [
            f"{spread(r[f'{t}_fixed'], 1)} [{statistics.median(r[f'{t}_evaluations']):.1f}]"
            for t in ("files", "messages")] for r in rows])
    print_cpu([(f"{r['config']}, {label}", r[f"{name}_cpu"], r[name]) for r in rows
               for name, label in (("stock", "stock Flower app"), ("files", "fedit, files"),
                                   ("messages", "fedit, messages"))])
    for r in rows:
        stages = list(dict.fromkeys(k for name in ("stock", "files", "messages") for k in r[f"{name}_stages"][0]))
        print_table(f"{r['config']}: where the fixed cost goes (s, median of the repetitions)",
                    ["stage", "stock Flower app", "fedit, files", "fedit, messages"], [
            [stage] + [f"{statistics.median(s[stage] for s in r[f'{name}_stages']):.2f}"
                       if stage in r[f"{name}_stages"][0] else "-" for name in ("stock", "files", "messages")]
            for stage in stages])

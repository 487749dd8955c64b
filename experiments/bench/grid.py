"""`bench grid`: a manifest's runs grouped by what sets their cost, each group measured once, the whole projected."""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.bench.round import round_session
from experiments.bench.stock import round_stock
from experiments.bench.timing import measure, print_table, progress
from fed_app.config import RunConfig, to_snake


# Run-config keys that change what a run learns but not what a round costs: runs that differ only in
# these share one measurement in `bench grid`.
COST_FREE = {"seed", "split_seed", "partition", "classes_per_client", "num_rounds", "rounds_scaling", "eval_every",
             "test_every", "checkpoint_every", "run_dir", "tracker", "lr", "momentum", "weight_decay", "ridge_lambda"}


def group_by_cost(runs: list[RunConfig]) -> list[list[RunConfig]]:
    """Runs grouped so that the runs of a group differ only in COST_FREE keys, in first-seen order."""
    groups: dict[tuple, list[RunConfig]] = {}
    for cfg in runs:
        groups.setdefault(tuple((k, v) for k, v in sorted(cfg.to_dict().items()) if k not in COST_FREE), []).append(cfg)
    return list(groups.values())


def projected_seconds(cfg: RunConfig, round_s: float, fixed_s: float, val_s: float, test_s: float) -> float:
    """One run's wall time: fixed cost, every round, and the server's evaluations on its schedule."""
    from fed_app.server_app import evaluates_test, evaluates_val

    rounds = range(cfg.total_rounds + 1)
    return (fixed_s + cfg.total_rounds * round_s + val_s * sum(evaluates_val(cfg, r) for r in rounds)
            + test_s * sum(evaluates_test(cfg, r) for r in rounds))


def bench_grid(runs: list[RunConfig], rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float,
               against_stock: bool = False) -> list[dict]:
    """Project a manifest's wall time from measurements: per group of runs that cost the same per round, one
    short `flwr run` (median s/round, fixed cost per run) and the server's evaluations timed in process; with
    `against_stock`, the stock Flower app on the same model, data and J right after it (its fixed cost)."""
    from fed_app.flower.loaded_task import load_task

    groups = group_by_cost(runs)
    probes = [g[0].to_run_config() for g in groups]
    varying = [k for k in probes[0] if to_snake(k) not in COST_FREE and len({str(p[k]) for p in probes}) > 1]
    rows = []
    for members, values in zip(groups, probes):
        probe = members[0]
        flower = round_session(probe, rounds, warmup, workdir, cpus, gpus)
        progress(f"group {len(rows) + 1} of {len(groups)} ({len(members)} runs)", flower["round"], flower["fixed"])
        print(f"    in a session: fixed {flower['session_fixed']:.1f} s/run", file=sys.stderr, flush=True)
        print("    " + ", ".join(f"{k}: {v:.1f}" for k, v in flower["stages"].items()), file=sys.stderr, flush=True)
        task = load_task(probe)
        state = task.initial_state()
        val_s, _ = measure(lambda: task.evaluate(state, task.data.val), task.device, repeats=1)
        test_s, _ = measure(lambda: task.evaluate(state, task.data.test), task.device, repeats=1)
        # the runner runs a slot's runs in one session: its start-up and shut-down once per federation size
        total = sum(projected_seconds(c, flower["round"], flower["session_fixed"], val_s, test_s) for c in members)
        if probe.num_clients not in {g[0].num_clients for g in groups[:len(rows)]}:
            total += flower["fixed"] - flower["session_fixed"]
        rows.append({"config": " ".join(f"{k}={values[k]}" for k in varying) or "all runs", "runs": len(members),
                     "rounds": sum(c.total_rounds for c in members), "round": flower["round"],
                     "fixed": flower["fixed"], "session_fixed": flower["session_fixed"], "val": val_s,
                     "test": test_s, "hours": total / 3600, "stages": flower["stages"],
                     "session_stages": flower["session_stages"]})
        if against_stock:
            rows[-1]["stock"] = round_stock(probe, rounds, warmup, workdir, cpus, gpus)
            progress(f"group {len(rows)} of {len(groups)}, stock Flower app", rows[-1]["stock"]["round"],
                      rows[-1]["stock"]["fixed"])
    return rows


def print_grid(rows: list[dict], header: str) -> None:
    print_table(header, ["runs that cost alike", "runs", "rounds", "s/round (Flower)", "fixed s/run: alone",
                         "fixed s/run: in a session", "val eval s", "test eval s", "projected hours"], [
        [r["config"], str(r["runs"]), str(r["rounds"]), f"{r['round']:.3f}", f"{r['fixed']:.1f}",
         f"{r['session_fixed']:.1f}", f"{r['val']:.2f}", f"{r['test']:.2f}", f"{r['hours']:.2f}"] for r in rows])
    print(f"projected wall time of the whole manifest: {sum(r['hours'] for r in rows):.2f} h "
          f"({sum(r['runs'] for r in rows)} runs, one after another in one session, as the runner runs one slot; "
          f"checkpoint writes not counted)")
    stages = list(rows[0]["stages"])
    print_table("where the fixed cost of a run of its own goes (s; a later run of the session pays no start-up "
                "and no shut-down)", ["runs that cost alike"] + stages, [
        [r["config"]] + [f"{r['stages'][k]:.2f}" for k in stages] for r in rows])
    if "stock" not in rows[0]:
        return
    stages = list(dict.fromkeys([*rows[0]["stock"]["stages"], *stages]))
    print_table("fixed cost per run (s): fedit against the stock Flower app on the same model, data and J "
                "(plain FedAvg: no step 0, no evaluation)",
                ["runs that cost alike", "app", "s/round", "fixed s/run"] + stages, [
        [r["config"], app, f"{m['round']:.3f}", f"{m['fixed']:.1f}"]
        + [f"{m['stages'][k]:.2f}" if k in m["stages"] else "-" for k in stages]
        for r in rows for app, m in (("stock Flower app", r["stock"]), ("fedit, a run of its own", r),
                                     ("fedit, a later run of a session", {**r, "fixed": r["session_fixed"],
                                                                          "stages": r["session_stages"]}))])

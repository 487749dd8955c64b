"""Benchmarks that print a table and ratios: `python -m experiments bench fisher | round | data`."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.cpu import KINDS, CpuSampler
from fed_app.config import RunConfig, to_snake
from fed_app.head import freeze_head
from fed_app.model import build_model
from masking.fisher import fisher_diagonal


def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Best wall time of `repeats` runs after one warm-up, and peak CUDA memory in MiB (None on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return best, peak


def _loop_fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one forward and backward per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in params.items():
            scores[n] += p.grad.square()
    return scores


def bench_fisher(model_name: str, samples: int, chunk: int, repeats: int, device: torch.device) -> list[dict]:
    model, spec = build_model(RunConfig(model=model_name, model_weights="random"), 100)
    model.to(device).eval()
    freeze_head(model)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(samples, 3, spec.input_size, spec.input_size, device=device, generator=g)
    y = torch.randint(0, 100, (samples,), device=device, generator=g)
    methods = {
        "exact per-sample (vmap)": lambda: fisher_diagonal(model, x, y, mode="empirical", chunk_size=chunk),
        "per-sample backward loop": lambda: _loop_fisher(model, x, y),
        "batch shortcut (not exact)": lambda: fisher_diagonal(model, x, y, mode="batch", chunk_size=chunk),
    }
    rows = []
    for name, fn in methods.items():
        seconds, peak = _measure(fn, device, repeats)
        rows.append({"method": name, "s_per_1000": seconds * 1000 / samples, "peak_mib": peak})
    return rows


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table under a title line, as results/benchmarks.md records it."""
    print(title)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_fisher(rows: list[dict], header: str) -> None:
    loop = next(r["s_per_1000"] for r in rows if "loop" in r["method"])
    print_table(header, ["method", "s / 1000 samples", "peak MiB", "loop time / this"], [
        [r["method"], f"{r['s_per_1000']:.3f}", "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
         f"{loop / r['s_per_1000']:.1f}x"] for r in rows])


def _progress(what: str, seconds_per_round: float, fixed: float | None = None) -> None:
    """One line on stderr per measurement as it ends, so that a long benchmark cut short still says something."""
    tail = f", fixed {fixed:.1f} s/run" if fixed is not None else ""
    print(f"  {what}: {seconds_per_round:.3f} s/round{tail}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def round_limit(cfg: RunConfig, rounds: int, warmup: int) -> float:
    """Median seconds per round of the same client training in a plain in-process loop: for each sampled
    client in turn, J steps from the global model, its delta (only trainable entries under a mask), then
    the example-weighted average added to the global model. No Flower, no serialization; on a CPU, torch's
    default threads (all cores), where the simulation runs one single-threaded client per core."""
    from fed_app.loaded_task import load_task
    from masking.calibrate import calibrate
    from fed_app.wire import Form, add_trainable_, gather_trainable
    from strategies.fedavg import sample_partitions, weighted_average

    task = load_task(cfg)
    state = task.initial_state()
    masks = None
    if cfg.optimizer == "sparse-sgdm":  # which entries are trainable does not change a round's cost
        masks = {n: m.cpu() for n, m in calibrate(task.model, "random", cfg.sparsity, 1, None, seed=0).items()}
    times = []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        deltas, weights = [], []
        for pid in sample_partitions(cfg.seed, r, cfg.num_clients, cfg.clients_per_round):
            delta, _, n = task.local_update(state, pid, r, masks)
            deltas.append({Form.VALUES: gather_trainable(delta, masks)} if masks else delta)
            weights.append(n)
        avg = weighted_average(deltas, weights)
        if masks:
            add_trainable_(state, avg[Form.VALUES], masks)
        else:
            state = {k: v + avg[k] for k, v in state.items()}
        _sync(task.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def round_flower(cfg: RunConfig, rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float,
                 profile: bool = False) -> dict[str, float]:
    """The fedit app under `flwr run` for `rounds` rounds: median seconds per training round (first `warmup`
    rounds and the last, which evaluates, excluded), mean bytes per round to and from clients, and the
    run's fixed cost: the wall time of the whole `flwr run` less its rounds at that steady rate and less the
    server's evaluations (timed only with `profile`, which also gives each phase's median, `profile_*`, and
    where the fixed cost goes, `stages`)."""
    from fed_app.local_federation import LocalFederation
    from fed_app.server_app import PROFILE

    run_cfg = _bench_config(cfg, rounds, workdir)
    started = time.time()
    with LocalFederation(workdir / ".flwr", extra_env={PROFILE: "1"} if profile else None) as sim, \
            CpuSampler(sim.home) as cpu:
        sim.run(run_cfg, num_supernodes=cfg.num_clients, cpus=cpus, gpus=gpus)
    ended = time.time()
    result = _measured(run_cfg, rounds, warmup, started, ended)
    if profile:
        result["stages"] = fixed_stages(result["marks"], result["rows"], started, ended, result["round"])
        result["cpu"] = _cpu_per_round(cpu, result["marks"]["round_ended"][warmup - 1:rounds - 1])
    return result


def _bench_config(cfg: RunConfig, rounds: int, workdir: Path, tag: str = "") -> RunConfig:
    """`cfg` for `rounds` rounds that evaluate only at round 0 and at the end, in a run folder of its own."""
    return cfg.replace(num_rounds=rounds, rounds_scaling=False, eval_every=10**6, test_every=0,
                       checkpoint_every=10**6,
                       run_dir=str((workdir / f"run-{cfg.run_id()}-{time.monotonic_ns()}{tag}").resolve()))


def _measured(run_cfg: RunConfig, rounds: int, warmup: int, started: float, ended: float) -> dict:
    """A finished run's median seconds per steady round (first `warmup` rounds and the last, which evaluates,
    excluded), mean bytes per round each way, each profiled phase's median, its fixed cost between `started` and
    `ended` (less its rounds at that rate and less the server's evaluations), its rows and marks."""
    rows = [json.loads(line) for line in (Path(run_cfg.run_dir) / "rows.jsonl").read_text().splitlines()]
    steady = [r for r in rows if warmup < r["round"] < rounds]
    steady_s = statistics.median(r["round_time"] for r in steady)
    evaluations = sum(r.get("profile_evaluate", 0.0) for r in rows)  # work the stock app does not do
    marks = Path(run_cfg.run_dir) / "profile.json"
    return {"round": steady_s, "down": statistics.mean(r["bytes_sent"] for r in steady),
            "up": statistics.mean(r["bytes_received"] for r in steady),
            "fixed": ended - started - rounds * steady_s - evaluations, "evaluations": evaluations,
            **{k: statistics.median(r[k] for r in steady) for k in steady[0] if k.startswith("profile_")},
            "rows": rows, "marks": json.loads(marks.read_text()) if marks.exists() else {}}


def round_session(cfg: RunConfig, rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float) -> dict:
    """Two runs of `cfg` in one session, as the runner runs a slot's runs (fed_app/session.py). The first is
    measured as round_flower measures a run of its own (its rate, fixed cost and stages; its shut-down is the
    session's); the second gives the fixed cost of every later run of a slot, 'session_fixed': its wall time from
    submit to done less its rounds at the steady rate and less the server's evaluations, and its 'session_stages'."""
    from fed_app.local_federation import LocalFederation
    from fed_app.server_app import PROFILE
    from fed_app.session import Session

    runs = [_bench_config(cfg, rounds, workdir, f"-{k}") for k in (1, 2)]
    spans = []
    with LocalFederation(workdir / ".flwr", extra_env={PROFILE: "1"}) as sim:
        session = Session(sim, cpus=cpus, gpus=gpus)
        for run_cfg in runs:
            spans.append([time.time()])
            session.run(run_cfg)
            spans[-1].append(time.time())
        closing = time.time()
        session.close()
        closed = time.time() - closing
    first_end = spans[0][1] + closed  # the first run's shut-down: noticing it is done, and closing the session
    first = _measured(runs[0], rounds, warmup, spans[0][0], first_end)
    first["stages"] = fixed_stages(first["marks"], first["rows"], spans[0][0], first_end, first["round"])
    second = _measured(runs[1], rounds, warmup, *spans[1])
    first["session_fixed"] = second["fixed"]
    first["session_stages"] = fixed_stages(second["marks"], second["rows"], *spans[1], second["round"])
    return first


def _cpu_per_round(cpu: CpuSampler, ends: list[float]) -> dict[str, float]:
    """CPU seconds by kind of process per round, over the rounds between the first and the last of these ends."""
    spent = cpu.between(ends[0], ends[-1])
    return {kind: seconds / (len(ends) - 1) for kind, seconds in spent.items()}


def fixed_stages(marks: dict[str, float], rows: list[dict], started: float, ended: float,
                 steady_round: float) -> dict[str, float]:
    """Where a run's fixed cost goes (the wall time less its rounds at the steady rate and less the server's
    evaluations), from the ServerApp's marks (profile.json) and the rows; the stages add up to it."""
    trained = [r for r in rows if r["round"] > 0]
    rounds = sum(r["round_time"] for r in trained)
    return {"start-up (SuperLink, simulation, ServerApp)": marks["started"] - started,
            "claim": marks["claimed"] - marks["started"],
            "nodes' partition ids (query round; the server's task builds meanwhile)":
                marks["discovered"] - marks["claimed"],
            "the server's task (data, model) beyond the query round": marks["task_loaded"] - marks["discovered"],
            "step 0": rows[0]["round_time"] - rows[0].get("profile_evaluate", 0.0),
            "rounds beyond the steady rate (worker builds in round 1)":
                rounds - len(trained) * steady_round - sum(r.get("profile_evaluate", 0.0) for r in trained),
            "checkpoints, curves, bookkeeping": marks["steps_done"] - marks["task_loaded"] - rounds
                                                - rows[0]["round_time"],
            "closing the run": marks["finished"] - marks["steps_done"],
            "shut-down (simulation, SuperLink)": ended - marks["finished"]}


PHASES = [("send", "server: the round's payload (model file written, or message built)"),
          ("exchange", "Flower: messages out, the clients' work, replies back"),
          ("client_read", "clients: the global model read and rebuilt"),
          ("client_train", "clients: the J steps and the delta"),
          ("client_write", "clients: the update written (file) or put in the reply"),
          ("aggregate", "server: replies read and averaged"),
          ("apply", "server: the mean added to the global model")]


def bench_profile(cfg: RunConfig, local_steps: list[int], rounds: int, warmup: int, workdir: Path, cpus: int,
                  gpus: float) -> list[dict]:
    """Where a round's seconds go, per J and transport (dense): each phase's median over the steady rounds."""
    rows = []
    for j in local_steps:
        for transport in ("files", "messages"):
            c = cfg.replace(local_steps=j, optimizer="sgdm", transport=transport)
            rows.append({"config": f"J={j}, {transport}", "clients": c.clients_per_round,
                         **round_flower(c, rounds, warmup, workdir, cpus, gpus, profile=True)})
            _progress(rows[-1]["config"], rows[-1]["round"], rows[-1]["fixed"])
    return rows


def print_profile(rows: list[dict], header: str, slots: int, cpu: bool = True) -> None:
    """Seconds per round by phase; client phases are summed over the round's clients, and Flower's own share
    of the exchange is estimated as the exchange less the clients' summed work spread over `slots`."""
    print_table(header, ["config", "round"] + [name for name, _ in PHASES] + ["Flower transit (est.)", "other"], [
        [r["config"], f"{r['round']:.3f}"] + [f"{r[f'profile_{name}']:.3f}" for name, _ in PHASES]
        + [f"{r['profile_exchange'] - _client_work(r) / min(slots, r['clients']):.3f}",
           f"{r['round'] - sum(r[f'profile_{n}'] for n in ('send', 'exchange', 'aggregate', 'apply')):.3f}"]
        for r in rows])
    for name, meaning in PHASES:
        print(f"- {name}: {meaning}")
    print(f"- client phases are CPU-seconds summed over the round's clients, {slots} at a time; "
          f"other: the rest of the round (the server's row bookkeeping)")
    if cpu:
        print_cpu([(r["config"], [r["cpu"]], [r["round"]]) for r in rows])


def print_cpu(runs: list[tuple[str, list[dict[str, float]], list[float]]]) -> None:
    """CPU seconds per steady round by kind of process (median of the repetitions) beside the wall time: on a
    CPU-bound machine, what the server and Flower spend is what the clients lack."""
    med = statistics.median
    print_table("CPU-seconds per steady round by process (sampled from /proc; median of the repetitions)",
                ["config"] + list(KINDS) + ["total", "wall s/round"], [
        [label] + [f"{med(c[k] for c in cpu):.2f}" for k in KINDS] + [f"{med(sum(c.values()) for c in cpu):.2f}",
                                                                     f"{med(wall):.3f}"]
        for label, cpu, wall in runs])


def _client_work(row: dict) -> float:
    return sum(row[f"profile_client_{k}"] for k in ("read", "train", "write"))


STOCK_APP = Path(__file__).resolve().parents[1] / "benchmarks" / "stock_app"


def round_stock(cfg: RunConfig, rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float) -> dict[str, float]:
    """The stock Flower app (benchmarks/stock_app: Flower's examples' shape, fedit's model and client steps)
    under `flwr run` for `rounds` rounds: median seconds per round over the same rounds as round_flower, and
    the run's fixed cost (wall time of the whole `flwr run` less its rounds)."""
    from fed_app.local_federation import LocalFederation, toml_value

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
            "cpu": _cpu_per_round(cpu, ended[warmup:rounds]),
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
        _progress(f"J={j}, in-process limit", limit)
        runs: dict[str, list[dict]] = {"stock": [], "files": [], "messages": []}
        for rep in range(1, repeats + 1):
            runs["stock"].append(round_stock(c, rounds, warmup, workdir, cpus, gpus))
            for transport in ("files", "messages"):
                runs[transport].append(round_flower(c.replace(transport=transport), rounds, warmup, workdir, cpus,
                                                    gpus, profile=True))
            for name, reps in runs.items():
                _progress(f"J={j}, repetition {rep}, {name}", reps[-1]["round"], reps[-1]["fixed"])
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


def _spread(values: list[float], digits: int = 3) -> str:
    """'4.780 (4.71-4.95)': the median of the repetitions and their range."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def print_against_stock(rows: list[dict], header: str) -> None:
    med = statistics.median
    print_table(header, ["config", "in-process limit", "stock Flower app", "fedit, files", "fedit, messages",
                         "files / stock", "messages / stock", "files / limit"], [
        [r["config"], f"{r['limit']:.3f}", _spread(r["stock"]), _spread(r["files"]), _spread(r["messages"]),
         f"{med(r['files']) / med(r['stock']):.2f}x", f"{med(r['messages']) / med(r['stock']):.2f}x",
         f"{med(r['files']) / r['limit']:.2f}x"] for r in rows])
    print_table("fixed cost per run (s): the wall time of the whole `flwr run` less its rounds at the steady rate "
                "and less the server's evaluations (which the stock app does not do; in brackets)",
                ["config", "stock Flower app", "fedit, files", "fedit, messages"], [
        [r["config"], _spread(r["stock_fixed"], 1)] + [
            f"{_spread(r[f'{t}_fixed'], 1)} [{statistics.median(r[f'{t}_evaluations']):.1f}]"
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


def bench_round(cfg: RunConfig, local_steps: list[int], rounds: int, warmup: int, workdir: Path, cpus: int,
                gpus: float) -> list[dict]:
    """Each configuration's in-process limit, all of them before the first `flwr run` (so that no Flower
    process shares the machine with them), then each configuration on Flower."""
    configs = [cfg.replace(optimizer=o, head="ridge" if o == "sparse-sgdm" else cfg.head, local_steps=j,
                           mask_rule="random", calibration_rounds=1)
               for j in local_steps for o in ("sgdm", "sparse-sgdm")]
    names = [f"J={c.local_steps}, " + (f"{c.optimizer} (sparsity {c.sparsity})" if c.optimizer != "sgdm" else "dense")
             for c in configs]
    limits = []
    for c, name in zip(configs, names):
        limits.append(round_limit(c, rounds, warmup))
        _progress(f"{name}, in-process limit", limits[-1])
    rows = []
    for c, limit, name in zip(configs, limits, names):
        flower = round_flower(c, rounds, warmup, workdir, cpus, gpus)
        _progress(f"{name}, fedit on Flower", flower["round"], flower["fixed"])
        rows.append({"config": name, "limit": limit, "flower": flower["round"],
                     "down": flower["down"], "bytes": flower["up"]})
    return rows


def print_round(rows: list[dict], header: str) -> None:
    print_table(header, ["config", "in-process limit (s/round)", "fedit on Flower (s/round)", "Flower / limit",
                         "MiB to clients/round", "MiB from clients/round"], [
        [r["config"], f"{r['limit']:.3f}", f"{r['flower']:.3f}", f"{r['flower'] / r['limit']:.2f}x",
         f"{r['down'] / 2**20:.2f}", f"{r['bytes'] / 2**20:.2f}"] for r in rows])
    for dense, sparse in zip(rows[::2], rows[1::2]):
        print(f"{dense['config'].split(',')[0]}: sparse / dense upload: {sparse['bytes'] / dense['bytes']:.3f}, "
              f"download: {sparse['down'] / dense['down']:.3f}")


# Run-config keys that change what a run learns but not what a round costs: runs that differ only in
# these share one measurement in `bench grid`.
COST_FREE = {"seed", "split_seed", "partition", "classes_per_client", "num_rounds", "rounds_scaling", "eval_every",
             "test_every", "checkpoint_every", "run_dir", "claim_token", "session", "tracker", "lr", "momentum", "weight_decay", "ridge_lambda"}


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
    from fed_app.loaded_task import load_task

    groups = group_by_cost(runs)
    probes = [g[0].to_run_config() for g in groups]
    varying = [k for k in probes[0] if to_snake(k) not in COST_FREE and len({str(p[k]) for p in probes}) > 1]
    rows = []
    for members, values in zip(groups, probes):
        probe = members[0]
        flower = round_session(probe, rounds, warmup, workdir, cpus, gpus)
        _progress(f"group {len(rows) + 1} of {len(groups)} ({len(members)} runs)", flower["round"], flower["fixed"])
        print(f"    in a session: fixed {flower['session_fixed']:.1f} s/run", file=sys.stderr, flush=True)
        print("    " + ", ".join(f"{k}: {v:.1f}" for k, v in flower["stages"].items()), file=sys.stderr, flush=True)
        task = load_task(probe)
        state = task.initial_state()
        val_s, _ = _measure(lambda: task.evaluate(state, task.data.val), task.device, repeats=1)
        test_s, _ = _measure(lambda: task.evaluate(state, task.data.test), task.device, repeats=1)
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
            _progress(f"group {len(rows)} of {len(groups)}, stock Flower app", rows[-1]["stock"]["round"],
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


def bench_data(cfg: RunConfig, batches: int) -> list[dict]:
    """Device-side batch preparation (index, resize, normalize, augment) vs the training step's consumption."""
    from fed_app.batches import BatchTransform
    from fed_app.data import load_dataset
    from fed_app.model import build_model
    from fed_app.task import autocast, make_optimizer, resolve_device, training_module

    device = resolve_device(cfg)
    data = load_dataset(cfg, device)
    model, spec = build_model(cfg.replace(model_weights="random" if cfg.model == "vit-small-dino" else ""), 100)
    model.to(device).train()
    g = torch.Generator(device=device).manual_seed(0)
    idx = [torch.randint(0, len(data.train), (cfg.batch_size,), device=device, generator=g) for _ in range(batches)]
    rows = []
    for size in sorted({spec.input_size, 224}):
        tf = BatchTransform(size, spec.mean, spec.std, augment=True, interpolation=spec.interpolation)

        def prepare(tf=tf):
            for i in idx:
                tf(data.train.images[i], g)

        seconds, _ = _measure(prepare, device, repeats=3)
        rows.append({"stage": f"prepare batches at {size} px (crop+flip, resize, normalize)",
                     "images_per_s": batches * cfg.batch_size / seconds})
    opt = make_optimizer(cfg, model)
    tf = BatchTransform.for_model(spec, augment=True)
    precision = autocast(cfg, device)

    def train(module: torch.nn.Module, batches: list[torch.Tensor] = idx) -> None:
        for i in batches:
            with precision:
                loss = torch.nn.functional.cross_entropy(module(tf(data.train.images[i], g)), data.train.labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds, _ = _measure(lambda: train(model), device, repeats=5)
    what = f"training step incl. preparation ({cfg.model}, {spec.input_size} px"
    rows.append({"stage": f"{what}, eager)", "images_per_s": batches * cfg.batch_size / seconds})
    compiled = training_module(cfg.replace(compile=True), model)
    started = time.perf_counter()
    train(compiled, idx[:1])  # the compilation, paid once per worker process
    _sync(device)
    first = time.perf_counter() - started
    seconds, _ = _measure(lambda: train(compiled), device, repeats=5)
    rows.append({"stage": f"{what}, torch.compile; compiling took {first:.1f} s)",
                 "images_per_s": batches * cfg.batch_size / seconds})
    return rows


def print_data(rows: list[dict], header: str) -> None:
    print_table(header, ["stage", "images / s"], [[r["stage"], f"{r['images_per_s']:,.0f}"] for r in rows])

"""`bench round`: the compute limit of a round against Flower (files, messages), and `--profile`: where its seconds go."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from experiments.bench.timing import print_table, progress, sync
from experiments.cpu import KINDS, CpuSampler
from fed_app.config import RunConfig


def round_limit(cfg: RunConfig, rounds: int, warmup: int) -> float:
    """Median seconds per round of the same client training in a plain in-process loop: for each sampled
    client in turn, J steps from the global model, its delta (only trainable entries under a mask), then
    the example-weighted average added to the global model. No Flower, no serialization; on a CPU, torch's
    default threads (all cores), where the simulation runs one single-threaded client per core."""
    from fed_app.flower.loaded_task import load_task
    from masking.calibrate import calibrate
    from fed_app.flower.payload import Form, add_trainable_, gather_trainable
    from strategies.fedavg import sample_partitions, weighted_average
    from strategies.method import local_update

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
            delta, _, n = local_update(task, state, pid, r, masks)
            deltas.append({Form.VALUES: gather_trainable(delta, masks)} if masks else delta)
            weights.append(n)
        avg = weighted_average(deltas, weights)
        if masks:
            add_trainable_(state, avg[Form.VALUES], masks)
        else:
            state = {k: v + avg[k] for k, v in state.items()}
        sync(task.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def round_flower(cfg: RunConfig, rounds: int, warmup: int, workdir: Path, cpus: int, gpus: float,
                 profile: bool = False) -> dict[str, float]:
    """The fedit app under `flwr run` for `rounds` rounds: median seconds per training round (first `warmup`
    rounds and the last, which evaluates, excluded), mean bytes per round to and from clients, and the
    run's fixed cost: the wall time of the whole `flwr run` less its rounds at that steady rate and less the
    server's evaluations (timed only with `profile`, which also gives each phase's median, `profile_*`, and
    where the fixed cost goes, `stages`)."""
    from fed_app.local.local_federation import LocalFederation
    from fed_app.runs.profile import PROFILE

    run_cfg = _bench_config(cfg, rounds, workdir)
    started = time.time()
    with LocalFederation(workdir / ".flwr", extra_env={PROFILE: "1"} if profile else None) as sim, \
            CpuSampler(sim.home) as cpu:
        sim.run(run_cfg, num_supernodes=cfg.num_clients, cpus=cpus, gpus=gpus)
    ended = time.time()
    result = _measured(run_cfg, rounds, warmup, started, ended)
    if profile:
        result["stages"] = fixed_stages(result["marks"], result["rows"], started, ended, result["round"])
        result["cpu"] = cpu_per_round(cpu, result["marks"]["round_ended"][warmup - 1:rounds - 1])
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
    """Two runs of `cfg` in one session, as the runner runs a slot's runs (fed_app/local/session.py). The first is
    measured as round_flower measures a run of its own (its rate, fixed cost and stages; its shut-down is the
    session's); the second gives the fixed cost of every later run of a slot, 'session_fixed': its wall time from
    submit to done less its rounds at the steady rate and less the server's evaluations, and its 'session_stages'."""
    from fed_app.local.local_federation import LocalFederation
    from fed_app.runs.profile import PROFILE
    from fed_app.local.session import Session

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


def cpu_per_round(cpu: CpuSampler, ends: list[float]) -> dict[str, float]:
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
            progress(rows[-1]["config"], rows[-1]["round"], rows[-1]["fixed"])
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
        progress(f"{name}, in-process limit", limits[-1])
    rows = []
    for c, limit, name in zip(configs, limits, names):
        flower = round_flower(c, rounds, warmup, workdir, cpus, gpus)
        progress(f"{name}, fedit on Flower", flower["round"], flower["fixed"])
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

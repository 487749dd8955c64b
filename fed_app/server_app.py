"""ServerApp: RunConfig -> restore or init -> SeededFedAvg round loop -> rows, checkpoints, DONE."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_app.config import ConfigError, RunConfig
from fed_app.plots import plot_curves
from fed_app.rundir import RunDir
from fed_app.worker import State, get_worker
from strategies.fedavg import SeededFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_run_config(context.run_config))


def run(grid: Grid, cfg: RunConfig) -> RunDir:
    """FedAvg for cfg.total_rounds rounds, resuming from the run's last checkpoint."""
    run_dir = RunDir.for_config(cfg, group="federated")
    run_dir.claim(cfg)
    if run_dir.done:
        log.info("run %s is already done; nothing to do", run_dir.path)
        return run_dir
    worker = get_worker(cfg)  # the server evaluates the global model with the same task code
    state, start, elapsed = _restore(run_dir, worker)
    strategy = SeededFedAvg(cfg.seed, cfg.num_clients, cfg.clients_per_round, discover_partitions(grid, cfg),
                            cfg.max_retries if cfg.on_client_failure == "retry" else 0, cfg.round_timeout)
    rounds = cfg.total_rounds
    t0 = time.perf_counter() - elapsed
    for server_round in range(start + 1, rounds + 1):
        t_round = time.perf_counter()
        delta, metrics = strategy.train_round(grid, server_round, ArrayRecord(state), ConfigRecord())
        update = delta.to_torch_state_dict()
        state = {k: v + update[k] for k, v in state.items()}
        row = {"round": server_round, "train_loss": metrics["train_loss"], "clients": metrics["clients"],
               "bytes_sent": strategy.bytes_sent, "bytes_received": strategy.bytes_received}
        last = server_round == rounds
        if last or server_round % cfg.eval_every == 0:
            row.update(_prefixed("val", worker.evaluate(state, worker.data.val)))
        if last or (cfg.test_every and server_round % cfg.test_every == 0):
            row.update(_prefixed("test", worker.evaluate(state, worker.data.test)))
        row["round_time"] = time.perf_counter() - t_round
        row["wall_time"] = time.perf_counter() - t0
        run_dir.append_row(row)
        if last or server_round % cfg.checkpoint_every == 0:
            run_dir.save_checkpoint({"round": server_round, "model": state, "wall_time": row["wall_time"],
                                     "config": cfg.to_dict()})
        log.info("round %d/%d  train_loss %.4f  val_acc %s", server_round, rounds, row["train_loss"],
                 row.get("val_accuracy", "-"))
    plot_curves(run_dir.rows(), run_dir.path / "curves.png", x="round", title=f"FedAvg {cfg.run_id()}")
    run_dir.mark_done()
    return run_dir


def _prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}_{k}": v for k, v in metrics.items()}


def _restore(run_dir: RunDir, worker) -> tuple[State, int, float]:
    """(global weights, last finished round, wall time so far): from the checkpoint, or the seeded init."""
    ckpt = run_dir.load_checkpoint()
    if ckpt is None:
        run_dir.keep_rows("round", 0)
        return worker.initial_state(), 0, 0.0
    run_dir.keep_rows("round", ckpt["round"])
    log.info("resuming %s after round %d", run_dir.path, ckpt["round"])
    return ckpt["model"], ckpt["round"], ckpt["wall_time"]


def discover_partitions(grid: Grid, cfg: RunConfig, wait_s: float = 30.0) -> dict[int, int]:
    """partition id -> node id, asked of every connected node once; all of 0..K-1 must be there."""
    deadline = time.monotonic() + wait_s
    while len(node_ids := list(grid.get_node_ids())) < cfg.num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
    if len(node_ids) != cfg.num_clients:
        raise ConfigError(
            f"num-clients={cfg.num_clients} but {len(node_ids)} nodes are connected after {wait_s:.0f}s; start "
            f"exactly {cfg.num_clients} supernodes (--federation-config \"num-supernodes={cfg.num_clients}\")."
        )
    queries = [Message(RecordDict(), node, MessageType.QUERY) for node in node_ids]
    nodes = {}
    for reply in grid.send_and_receive(queries, timeout=cfg.round_timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                               f"{reply.error.reason}")
        nodes[int(reply.content["info"]["partition-id"])] = reply.metadata.src_node_id
    if sorted(nodes) != list(range(cfg.num_clients)):
        raise ConfigError(
            f"num-clients={cfg.num_clients} but the federation's {len(node_ids)} nodes hold partitions "
            f"{sorted(nodes)[:5]}...; start exactly {cfg.num_clients} supernodes "
            f"(--federation-config \"num-supernodes={cfg.num_clients}\")."
        )
    return nodes

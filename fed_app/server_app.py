"""ServerApp: RunConfig -> restore or init -> SeededFedAvg round loop -> rows, checkpoints, DONE."""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_app.config import ConfigError, RunConfig
from fed_app.federated_editing import federated_head, federated_masks
from fed_app.plots import plot_curves
from fed_app.rundir import RunDir
from fed_app.worker import State, get_worker
from masking.calibrate import density_of
from masking.payload import add_trainable_, pack_masks
from strategies.fedavg import SeededFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_run_config(context.run_config))


def run(grid: Grid, cfg: RunConfig) -> RunDir:
    """Step 0 and calibration when asked, then FedAvg for cfg.total_rounds rounds; resumes from checkpoints."""
    run_dir = RunDir.for_config(cfg, group="federated")
    run_dir.claim(cfg)
    if run_dir.done:
        log.info("run %s is already done; nothing to do", run_dir.path)
        return run_dir
    worker = get_worker(cfg)  # the server evaluates the global model with the same task code
    strategy = SeededFedAvg(cfg.seed, cfg.num_clients, cfg.clients_per_round, discover_partitions(grid, cfg),
                            cfg.max_retries if cfg.on_client_failure == "retry" else 0, cfg.round_timeout)
    rounds = cfg.total_rounds
    t0 = time.perf_counter()

    def finish_round(server_round: int, state: State, masks, row: dict) -> None:
        last = server_round == rounds
        if last or server_round % cfg.eval_every == 0:
            row.update(_prefixed("val", worker.evaluate(state, worker.data.val)))
        if last or server_round == 0 or (cfg.test_every and server_round % cfg.test_every == 0):
            row.update(_prefixed("test", worker.evaluate(state, worker.data.test)))
        row["round_time"] = time.perf_counter() - t_round
        row["wall_time"] = time.perf_counter() - t0
        run_dir.append_row(row)
        if last or server_round % cfg.checkpoint_every == 0:
            run_dir.save_checkpoint({"round": server_round, "model": state, "masks": masks,
                                     "wall_time": row["wall_time"], "config": cfg.to_dict()})
        log.info("round %d/%d  val_acc %s", server_round, rounds, row.get("val_accuracy", "-"))

    state, masks, start, elapsed = _restore(run_dir)
    t0 -= elapsed
    if start is None:  # fresh: step 0, calibration, and the starting point as round 0
        t_round = time.perf_counter()
        state = federated_head(grid, cfg, strategy, worker, worker.initial_state())
        masks = federated_masks(grid, cfg, strategy, worker, state) if cfg.optimizer == "sparse-sgdm" else None
        if masks is not None:
            run_dir.save_mask(masks)
        finish_round(0, state, masks, {"round": 0, "density": density_of(masks) if masks else 1.0,
                                       "bytes_sent": strategy.bytes_sent, "bytes_received": strategy.bytes_received})
        start = 0
    if masks is not None:
        strategy.extra_records["mask"] = ArrayRecord({"bits": torch.from_numpy(pack_masks(masks))})
    for server_round in range(start + 1, rounds + 1):
        t_round = time.perf_counter()
        delta, metrics = strategy.train_round(grid, server_round, ArrayRecord(state), ConfigRecord())
        state = _apply(state, delta.to_torch_state_dict(), masks)
        finish_round(server_round, state, masks, {
            "round": server_round, "train_loss": metrics["train_loss"], "clients": metrics["clients"],
            "bytes_sent": strategy.bytes_sent, "bytes_received": strategy.bytes_received})
    plot_curves(run_dir.rows(), run_dir.path / "curves.png", x="round", title=f"FedAvg {cfg.run_id()}")
    run_dir.mark_done()
    return run_dir


def _apply(state: State, update: State, masks) -> State:
    """global + averaged delta; under a mask only the trainable entries are touched."""
    if masks is None:
        return {k: v + update[k] for k, v in state.items()}
    state = {k: v.clone() for k, v in state.items()}
    add_trainable_(state, update["values"], masks)
    return state


def _prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}_{k}": v for k, v in metrics.items()}


def _restore(run_dir: RunDir) -> tuple[State | None, dict | None, int | None, float]:
    """(global weights, masks, last finished round, wall time so far) from the checkpoint; Nones if fresh."""
    ckpt = run_dir.load_checkpoint()
    if ckpt is None:
        run_dir.keep_rows("round", -1)
        return None, None, None, 0.0
    run_dir.keep_rows("round", ckpt["round"])
    log.info("resuming %s after round %d", run_dir.path, ckpt["round"])
    return ckpt["model"], ckpt["masks"], ckpt["round"], ckpt["wall_time"]


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

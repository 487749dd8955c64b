"""ServerApp: RunConfig -> restore or init -> SeededFedAvg round loop -> rows, checkpoints, DONE."""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_app.config import RunConfig
from fed_app.federated_editing import federated_head, federated_local_masks, federated_masks
from fed_app.federation import Federation
from fed_app.mask_plan import MaskPlan
from fed_app.plots import plot_curves
from fed_app.rundir import RunDir
from fed_app.task import client_lr
from fed_app.transport import SharedFiles
from fed_app.wire import Form, flat_state, pack_state, split_flat
from fed_app.worker import State, get_worker
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
    files = None
    if cfg.transport == "files":  # room for a round: the global model and every client's update
        model_bytes = 4 * sum(t.numel() for t in worker.model.state_dict().values())
        files = SharedFiles(cfg.run_id(), (cfg.clients_per_round + 2) * model_bytes)
    try:
        strategy = SeededFedAvg(cfg.seed, cfg.num_clients, cfg.clients_per_round, Federation.discover(grid, cfg),
                                files, cfg.aggregation)
        _rounds(cfg, run_dir, worker, strategy)
    finally:
        if files is not None:
            files.close()
    return run_dir


def _rounds(cfg: RunConfig, run_dir: RunDir, worker, strategy: SeededFedAvg) -> None:
    """Step 0 and calibration when fresh, then the FedAvg rounds left; rows, checkpoints, DONE."""
    rounds = cfg.total_rounds
    t0 = time.perf_counter()

    def finish_round(server_round: int, state: State, row: dict, started: float) -> None:
        last = server_round == rounds
        if evaluates_val(cfg, server_round):
            row.update(_prefixed("val", worker.evaluate(state, worker.data.val)))
            if cfg.fraction_evaluate > 0:  # the global model on the clients' own data (telling when non-iid)
                row.update(_prefixed("client", strategy.evaluate_round(server_round, pack_state(state),
                                                                       cfg.evaluate_clients)))
        if evaluates_test(cfg, server_round):
            row.update(_prefixed("test", worker.evaluate(state, worker.data.test)))
        row["round_time"] = time.perf_counter() - started
        row["wall_time"] = time.perf_counter() - t0
        run_dir.append_row(row)
        if last or server_round % cfg.checkpoint_every == 0:
            run_dir.save_checkpoint({"round": server_round, "model": state, "wall_time": row["wall_time"],
                                     "config": cfg.to_dict()})
        log.info("round %d/%d  val_acc %s", server_round, rounds, row.get("val_accuracy", "-"))

    state, start, elapsed = _restore(run_dir)
    t0 -= elapsed
    if start is None:  # fresh: step 0, calibration, and the starting point as round 0
        started = time.perf_counter()
        federation = strategy.federation
        before = federation.bytes_sent, federation.bytes_received
        state, plan, found = _step_zero(cfg, strategy, worker, run_dir)
        finish_round(0, state, {"round": 0, "density": plan.density if plan else 1.0, **found,
                                "bytes_sent": federation.bytes_sent - before[0],  # every step-0 exchange
                                "bytes_received": federation.bytes_received - before[1]}, started)
        start = 0
    else:  # resumed: the masks were saved before the round-0 checkpoint; calibration is not redone
        plan = MaskPlan.load(run_dir, worker.trainable_shapes(), cfg)
    if all(t.dtype == torch.float32 for t in state.values()):  # one buffer: a round's payload is not a copy
        state = split_flat(flat_state(state)[Form.FLAT], {n: t.shape for n, t in state.items()})
    strategy.use_masks(plan, compact=plan is not None and plan.shared is not None
                       and _frozen_as_initial(state, plan.shared, worker.initial_state()))
    for server_round in range(start + 1, rounds + 1):
        started = time.perf_counter()
        state, metrics = strategy.advance(server_round, state)
        finish_round(server_round, state, {
            "round": server_round, "learning_rate": client_lr(cfg, server_round),
            "train_loss": metrics["train_loss"], "clients": metrics["clients"],
            "worker_builds": metrics["worker_builds"],
            "bytes_sent": metrics["bytes_sent"], "bytes_received": metrics["bytes_received"]}, started)
    plot_curves(run_dir.rows(), run_dir.path / "curves.png", x="round", title=f"FedAvg {cfg.run_id()}")
    run_dir.mark_done()


def evaluates_val(cfg: RunConfig, server_round: int) -> bool:
    """Whether the round's row holds validation metrics: every eval-every rounds (round 0 too) and the last."""
    return server_round == cfg.total_rounds or server_round % cfg.eval_every == 0


def evaluates_test(cfg: RunConfig, server_round: int) -> bool:
    """Whether the round's row holds test metrics: round 0, the last round, and every test-every rounds."""
    return server_round in (0, cfg.total_rounds) or bool(cfg.test_every and server_round % cfg.test_every == 0)


def _step_zero(cfg: RunConfig, strategy: SeededFedAvg, worker, run_dir: RunDir):
    """(global weights after step 0, the mask plan or None when dense, what step 0 found for the round-0
    row); the plan saved."""
    state, found = federated_head(cfg, strategy, worker, worker.initial_state())
    if cfg.optimizer != "sparse-sgdm":
        return state, None, found
    if cfg.mask_scope == "global":
        plan = MaskPlan.global_mask(federated_masks(cfg, strategy, worker, state), cfg.num_clients)
    else:
        plan = MaskPlan.local_masks(federated_local_masks(cfg, strategy, worker, state))
    plan.save(run_dir)
    return state, plan, found


def _frozen_as_initial(state: State, masks, initial: State) -> bool:
    """Whether every frozen entry still equals the seeded initial model, so that clients can rebuild the
    global model from their own copy of it plus the trainable entries (the compact downlink)."""
    same = all(torch.equal(state[n][~m], initial[n][~m]) for n, m in masks.items())
    if not same:
        log.warning("frozen entries differ from the initial model; sending the dense model every round")
    return same


def _prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}_{k}": v for k, v in metrics.items()}


def _restore(run_dir: RunDir) -> tuple[State | None, int | None, float]:
    """(global weights, last finished round, wall time so far) from the checkpoint; Nones if fresh."""
    ckpt = run_dir.resume("round")
    if ckpt is None:
        return None, None, 0.0
    return ckpt["model"], ckpt["round"], ckpt["wall_time"]

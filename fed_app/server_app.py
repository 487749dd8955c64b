"""ServerApp: RunConfig -> the run loop (fed_app/runs/run_loop.py) over `Rounds`: restore or step 0, then SeededFedAvg
rounds -> rows, checkpoints, DONE."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fed_app.config import RunConfig, plumbing
from fed_app.errors import UserError
from fed_app.federated_editing import federated_head, federated_local_masks, federated_masks
from fed_app.flower.federation import Federation, RoundFailedError
from fed_app.flower.mask_plan import MaskPlan
from fed_app.task.partition import class_counts
from fed_app.runs.hooks import AtFinish, Curves
from fed_app.runs.plots import run_title
from fed_app.runs.profile import Marks, RoundProfile, profiling
from fed_app.runs.rundir import RunDir
from fed_app.runs.run_loop import claimed_run, run_steps
from fed_app.local.session import SESSION_RUN_ENDED, SessionFolder
from fed_app.task.train import client_lr
from fed_app.flower.payload import Form, Key, SharedFiles, flat_state, split_flat
from fed_app.flower.replies import NONFINITE
from fed_app.flower.loaded_task import LoadedTask, State, load_task
from masking.combine import combine_masks
from fed_app.registry import METHODS
from strategies.fedavg import SeededFedAvg
from strategies.privacy import EPSILON_COVERS

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    marks = Marks(started=time.time())
    _log_lines()
    cfg, commands = RunConfig.from_run_config(context.run_config), plumbing(context.run_config)
    if commands["session"]:
        serve(grid, SessionFolder(Path(commands["session"])), marks)
    else:
        run(grid, cfg, marks, claim_token=commands["claim-token"])


def serve(grid: Grid, session: SessionFolder, marks: Marks) -> None:
    """Session mode: each run the command submits, in turn, on this one federation, its outcome written back;
    until the command says stop or is gone. A failed run ends the session (the command starts a new one)."""
    n = 1
    while (submitted := session.next_run(n)) is not None:
        cfg, claim_token = submitted
        try:
            run(grid, cfg, marks, claim_token=claim_token)
        except BaseException as err:
            session.finish(n, str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}")
            raise
        log.info("%s %d", SESSION_RUN_ENDED, n)  # the command waits for this line: the run's log is all there
        session.finish(n, None)
        n, marks = n + 1, Marks(started=time.time())


def _log_lines() -> None:
    """fed_app's INFO lines (one per round: loss, validation accuracy) in the run's log, beside Flower's."""
    logger = logging.getLogger("fed_app")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(grid: Grid, cfg: RunConfig, marks: Marks | None = None, claim_token: str = "") -> RunDir:
    """Step 0 and calibration when asked, then FedAvg for cfg.total_rounds rounds; resumes from checkpoints.
    `claim_token`: the claim of the command that launched the run, adopted (else the run is claimed here)."""
    marks = Marks() if marks is None else marks
    with claimed_run(cfg, "federated", claim_token) as (run_dir, claim):
        if run_dir.finished_whole("round", cfg.total_rounds):
            log.info("run %s is already %s; nothing to do", run_dir.path, "done" if run_dir.done else "diverged")
            return run_dir
        _run(grid, cfg, run_dir, claim, marks)
        marks.mark("finished")
        marks.save(run_dir)
        return run_dir


def _run(grid: Grid, cfg: RunConfig, run_dir: RunDir, claim, marks: Marks) -> RunDir:
    marks.mark("claimed")
    federation, task = _discover_while_loading(grid, cfg, marks)
    files = None
    if cfg.transport == "files":  # room for a round: the global model and every client's update
        model_bytes = 4 * sum(t.numel() for t in task.model.state_dict().values())
        files = SharedFiles(cfg.run_id(), (cfg.clients_per_round + 2) * model_bytes)
    try:
        method = METHODS.get(cfg.client_algorithm)
        rounds = Rounds(cfg, run_dir, task, method.strategy(cfg, task, federation, files))  # the method's server hook
        hooks = [Curves("round", run_title(cfg, "federated")), AtFinish(lambda: method.finish(cfg))]
        if profiling():
            hooks.append(RoundProfile(rounds, marks))
        run_steps(cfg, run_dir, rounds, guard=claim.check, hooks=hooks)
        marks.mark("steps_done")
    finally:
        if files is not None:
            files.close()
    return run_dir


def _discover_while_loading(grid: Grid, cfg: RunConfig, marks: Marks) -> tuple[Federation, LoadedTask]:
    """The nodes' partition ids (a query round, in which each worker builds its own task) while the server
    builds its task (data and model: it evaluates the global model with the same task code) in a thread.
    If both fail, the server's own error is raised: it names the cause (e.g. data missing) in one sentence."""
    with ThreadPoolExecutor(1, thread_name_prefix="server-task") as pool:
        loading = pool.submit(load_task, cfg)
        try:
            federation = Federation.discover(grid, cfg)
        except Exception:
            loading.result()
            raise
        marks.mark("discovered")
        task = loading.result()
    marks.mark("task_loaded")
    return federation, task


class Rounds:
    """The federated run's steps (`run_loop.Steps`): step 0 and calibration through the clients, then FedAvg
    rounds of `strategy.advance`; the global model in every checkpoint, the mask plan saved once."""

    key = "round"

    def __init__(self, cfg: RunConfig, run_dir: RunDir, task: LoadedTask, strategy: SeededFedAvg):
        self.cfg, self.run_dir, self.task, self.strategy = cfg, run_dir, task, strategy
        self.total = cfg.total_rounds
        self.global_state: State = {}
        # the last round taken, the last one checkpointed, and the one before it (its checkpoint is kept on disk
        # until the next is written, so the clients' own state must keep what a resume from it needs)
        self.current = self.checkpointed = self.kept = 0
        self.phases: dict[str, float] = {}  # the last round's seconds by phase, for a RoundProfile
        self.evaluate_seconds: float | None = None  # and its evaluation's (None: the row holds none)

    def step_zero(self) -> dict:
        federation = self.strategy.federation
        before = federation.bytes_sent, federation.bytes_received
        task = self.task
        self.run_dir.save_shards(class_counts([s.cpu().numpy() for s in task.shards],
                                              task.data.train.labels.cpu().numpy(), task.data.num_classes))
        self.global_state, plan, found = _step_zero(self.cfg, self.strategy, self.task, self.run_dir)
        self._use(plan)
        return {"density": plan.density if plan else 1.0, **found,
                "bytes_sent": federation.bytes_sent - before[0],  # every step-0 exchange
                "bytes_received": federation.bytes_received - before[1]}

    def restore(self, checkpoint: dict) -> None:
        """The global model; the masks were saved before the round-0 checkpoint, so calibration is not redone."""
        self.global_state = checkpoint["model"]
        self.checkpointed = self.kept = checkpoint["round"]
        self.strategy.load_state_dict(checkpoint)
        self._use(MaskPlan.load(self.run_dir, self.task.trainable_shapes(), self.cfg))

    def _use(self, plan: MaskPlan | None) -> None:
        state = self.global_state
        if all(t.dtype == torch.float32 for t in state.values()):  # one buffer: a round's payload is not a copy
            self.global_state = split_flat(flat_state(state)[Form.FLAT], {n: t.shape for n, t in state.items()})
        self.strategy.use_masks(plan, compact=plan is not None and plan.shared is not None
                                and _frozen_as_initial(self.global_state, plan.shared, self.task.initial_state()))

    def step(self, server_round: int) -> dict:
        privacy = self.strategy.privacy
        if privacy is not None:  # dp-max-epsilon: stop before a round that would spend more (checkpoints())
            privacy.check_budget(server_round)
        config = ConfigRecord({Key.CHECKPOINTED: self.kept})  # what the clients' own state must keep
        try:
            self.global_state, metrics = self.strategy.advance(server_round, self.global_state, config)
        except RoundFailedError as err:
            if not err.reasons or not all(NONFINITE in reason for reason in err.reasons.values()):
                raise
            # every failed client's training blew up (or says so): the run diverged, as a loss that blows up does
            self.current = server_round
            return {"learning_rate": client_lr(self.cfg, server_round), "train_loss": float("nan"), "clients": 0,
                    "diverged": f"clients {sorted(err.reasons)} sent NaN or Inf at round {server_round}, "
                                f"after {self.cfg.max_retries} retries"}
        self.current = server_round
        row = {"learning_rate": client_lr(self.cfg, server_round), "train_loss": metrics["train_loss"],
               "clients": metrics["clients"], "task_builds": metrics["task_builds"],
               "bytes_sent": metrics["bytes_sent"], "bytes_received": metrics["bytes_received"]}
        row.update({k: metrics[k] for k in ("attackers", "clipped", "clipping_norm") if k in metrics})
        if privacy is not None:  # what the rounds so far spend (strategies/privacy.py)
            row.update(epsilon=privacy.epsilon(server_round), epsilon_covers=EPSILON_COVERS)
        self.phases = {k: float(v) for k, v in metrics.items() if k.startswith("time_")}
        return row

    def evaluate(self, server_round: int) -> dict:
        started = time.perf_counter()
        row = self._evaluate(server_round)
        self.evaluate_seconds = time.perf_counter() - started if row else None  # within the round's time
        return row

    def _evaluate(self, server_round: int) -> dict:
        cfg, task, state, row = self.cfg, self.task, self.global_state, {}
        if evaluates_val(cfg, server_round):
            row.update(_prefixed("val", task.evaluate(state, task.data.val)))
            if cfg.fraction_evaluate > 0:  # the global model on the clients' own data (telling when non-iid)
                row.update(_prefixed("client", self.strategy.evaluate_round(server_round, state,
                                                                            cfg.evaluate_clients)))
        if evaluates_test(cfg, server_round):
            row.update(_prefixed("test", task.evaluate(state, task.data.test)))
        return row

    def checkpoints(self, server_round: int) -> bool:
        """Every checkpoint-every rounds, and the last round within dp-max-epsilon (the run stops after it)."""
        privacy = self.strategy.privacy
        return server_round % self.cfg.checkpoint_every == 0 or (privacy is not None
                                                                  and privacy.exceeds(server_round + 1))

    def state(self) -> dict:
        self.kept, self.checkpointed = self.checkpointed, self.current
        return {"model": self.global_state, **self.strategy.state_dict()}


def evaluates_val(cfg: RunConfig, server_round: int) -> bool:
    """Whether the round's row holds validation metrics: every eval-every rounds (round 0 too) and the last."""
    return server_round == cfg.total_rounds or server_round % cfg.eval_every == 0


def evaluates_test(cfg: RunConfig, server_round: int) -> bool:
    """Whether the round's row holds test metrics: round 0, the last round, and every test-every rounds."""
    return server_round in (0, cfg.total_rounds) or bool(cfg.test_every and server_round % cfg.test_every == 0)


def _step_zero(cfg: RunConfig, strategy: SeededFedAvg, task, run_dir: RunDir):
    """(global weights after step 0, the mask plan or None when dense, what step 0 found for the round-0
    row); the plan saved."""
    state, found = federated_head(cfg, strategy, task, task.initial_state())
    if cfg.optimizer != "sparse-sgdm":
        return state, None, found
    if cfg.mask_scope == "global" and cfg.mask_aggregation != "scores":  # the clients' own masks, combined
        local = federated_local_masks(cfg, strategy, task, state)
        combined = combine_masks([local[p] for p in sorted(local)], cfg.mask_aggregation, cfg.mask_quorum, cfg.seed)
        plan = MaskPlan.global_mask(combined, cfg.num_clients)
    elif cfg.mask_scope == "global":
        plan = MaskPlan.global_mask(federated_masks(cfg, strategy, task, state), cfg.num_clients)
    else:
        plan = MaskPlan.local_masks(federated_local_masks(cfg, strategy, task, state))
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

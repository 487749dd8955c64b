"""A federated method, in one file: the run-config keys it reads, its checks, its server hook (the strategy that
samples, sends and aggregates) and its client hook (one client's train round), registered by name under
run-config `client-algorithm`. The ServerApp and the ClientApp call these hooks and nothing method-specific,
so a new method is a new file (or a module named in `plugins`):

    from fed_app.registry import METHODS
    from strategies.method import FedAvg

    @METHODS.register("my-method")
    class MyMethod(FedAvg):
        def client_train(self, task, request): ...   # and/or strategy(), check(), finish()

FedAvg is the base: its client hook is the local update (`local_update`: J steps from the global model, with
FedProx's proximal term when prox-mu > 0), its server hook SeededFedAvg (strategies/fedavg.py). SCAFFOLD is
strategies/scaffold.py; the server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) are
strategies/server_opt.py, for any method."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import RecordDict
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.flower.federation import Federation
from fed_app.flower.payload import Key, SharedFiles, split_flat
from fed_app.registry import METHODS, OBJECTIVES, SERVER_OPTIMIZERS
from fed_app.task.attacks import flipped_labels
from fed_app.task.batches import batch_stream
from fed_app.task.head import only_head_trainable
from fed_app.task.seeds import client_generator
from fed_app.task.train import Objective, autocast, client_lr, make_optimizer, train_steps
from strategies.fedavg import SeededFedAvg
from strategies.mean import aggregation_rule
from strategies.privacy import DpFedAvg

if TYPE_CHECKING:  # hints only: a report or a config check need not import timm
    from fed_app.flower.loaded_task import LoadedTask, State


@dataclass
class TrainRequest:
    """What one client's train round starts from: the global model (under the partition's masks, if sparse), and
    the message's records (the server's extras, e.g. SCAFFOLD's control variate, are there)."""

    state: State
    partition_id: int
    server_round: int
    content: RecordDict
    masks: dict[str, Tensor] | None = None
    folder: Path | None = None  # transport='files': where the reply's payloads go

    @property
    def head_only(self) -> bool:  # step 0's head rounds (head='train') train the head alone
        return self.content[Key.CONFIG].get(Key.PHASE, "") == "head"


@dataclass
class TrainReply:
    """One client's round: its delta (y - x over the whole state), mean loss and examples, and extra records for
    the server's side (`carry`ed, so that they go as files under transport='files')."""

    delta: State
    loss: float
    examples: int
    extra: dict = field(default_factory=dict)


@METHODS.register("fedavg")
class FedAvg:
    """FedAvg (McMahan et al. 2017): J local steps from the global model, the example-weighted mean of the deltas
    (through the server optimizer, if one is set). With prox-mu > 0 the clients' objective gets FedProx's term
    mu/2 ||w - w_global||^2 (Li et al. 2020; `proximal` below)."""

    settings: tuple[str, ...] = ("prox_mu",)  # keys that shape a run only under this method (applicability)

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError, in one sentence with the fix, for a combination this method cannot run."""

    def strategy(self, cfg: RunConfig, task: LoadedTask, federation: Federation,
                 files: SharedFiles | None) -> SeededFedAvg:
        """The server hook: the strategy that runs every round (sampling, records, aggregation)."""
        strategy = SeededFedAvg(*self.strategy_args(cfg, federation, files))
        strategy.privacy = DpFedAvg(cfg, task.state_shapes(), task.trainable_shapes()) if cfg.dp != "none" else None
        return strategy

    @staticmethod
    def strategy_args(cfg: RunConfig, federation: Federation, files: SharedFiles | None) -> tuple:
        server_optimizer = SERVER_OPTIMIZERS.get(cfg.server_optimizer).build(cfg)
        return (cfg.seed, cfg.num_clients, cfg.clients_per_round, federation, files, aggregation_rule(cfg),
                server_optimizer)

    def client_train(self, task: LoadedTask, request: TrainRequest) -> TrainReply:
        """The client hook: one client's train round, its delta in the process's reply buffer."""
        delta, loss, examples = local_update(task, request.state, request.partition_id, request.server_round,
                                             request.masks, head_only=request.head_only, out=task.reply_buffer())
        return TrainReply(delta, loss, examples)

    def finish(self, cfg: RunConfig) -> None:
        """The run is done: let go of what only a resume would need (e.g. the clients' own state)."""


def local_update(task: LoadedTask, global_state: State, partition_id: int, server_round: int,
                 masks: dict[str, Tensor] | None = None, head_only: bool = False,
                 correction: State | None = None, out: Tensor | None = None) -> tuple[State, float, int]:
    """J optimizer steps on this client's shard from the global model: (delta on CPU, mean loss, examples).
    With masks: SparseSGDM under them; head_only: only the head trains (step 0 in FL); correction: a tensor
    per trainable parameter name added to its gradient at every step (SCAFFOLD). The delta is views of one
    flat buffer: `out` (e.g. the task's reply_buffer()) or a new one."""
    cfg, model = task.cfg, task.model
    task.load(global_state)
    with only_head_trainable(model) if head_only else contextlib.nullcontext():
        lr = cfg.lr if head_only else client_lr(cfg, server_round)
        optimizer = make_optimizer(cfg, model, masks, lr)  # fresh each round, as in FedAvg
        shard = task.shards[partition_id]
        generator = client_generator(task.device, cfg.seed, server_round, partition_id, head_only)
        objective = OBJECTIVES.get(cfg.client_objective)(model)  # built from the global model
        if cfg.prox_mu > 0 and not head_only:
            objective = proximal(objective, model, cfg.prox_mu)
        if cfg.attack == "label-flip" and task.attacks(partition_id) and not head_only:
            objective = flipped_labels(objective, task.data.num_classes)
        added = [(p, correction[n].to(task.device)) for n, p in model.named_parameters()
                 if correction is not None and p.requires_grad]
        loss = train_steps(task.trainer, optimizer, task.data.train, batch_stream(shard, cfg.batch_size, generator),
                           cfg.local_steps, task.train_tf, generator, autocast(cfg, task.device),
                           objective=objective, correction=added)
    trained = model.state_dict()
    flat = torch.empty(sum(v.numel() for v in trained.values())) if out is None else out
    delta = split_flat(flat, {k: v.shape for k, v in trained.items()})  # views of one buffer: sent as is
    for k, v in trained.items():
        torch.sub(v.detach().cpu(), global_state[k], out=delta[k])
    return delta, loss, len(shard)


def proximal(objective: Objective, model: torch.nn.Module, mu: float) -> Objective:
    """FedProx (Li et al. 2020): `objective` + mu/2 ||w - w_global||^2 over the trainable parameters, with
    w_global the model as it is now (a local update builds it from the global model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        drift = sum((p - a).square().sum() for p, a in zip(params, anchor))
        return objective(logits, labels) + mu / 2 * drift

    return loss

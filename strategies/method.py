"""A federated method, in one file: the run-config keys it reads, its checks, its server hook (the strategy that
samples, sends and aggregates) and its client hook (one client's train round), registered by name under
run-config `client-algorithm`. The ServerApp and the ClientApp call these hooks and nothing method-specific,
so a new method is a new file (or a module named in `plugins`):

    from fed_app.registry import METHODS
    from strategies.method import FedAvg

    @METHODS.register("my-method")
    class MyMethod(FedAvg):
        def client_train(self, task, request): ...   # and/or strategy(), check(), finish()

FedAvg is the base (with FedProx's proximal term when prox-mu > 0); SCAFFOLD is strategies/scaffold.py; the
server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) are strategies/server_opt.py, for any method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import RecordDict
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.flower.federation import Federation
from fed_app.flower.transport import SharedFiles
from fed_app.flower.wire import Key
from fed_app.registry import METHODS, SERVER_OPTIMIZERS
from strategies.fedavg import SeededFedAvg, aggregation_rule
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
    mu/2 ||w - w_global||^2 (Li et al. 2020; fed_app/task/train.py `proximal`)."""

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
        """The client hook: one client's train round."""
        delta, loss, examples = task.local_update(request.state, request.partition_id, request.server_round,
                                                  request.masks, head_only=request.head_only,
                                                  out=task.reply_buffer())
        return TrainReply(delta, loss, examples)

    def finish(self, cfg: RunConfig) -> None:
        """The run is done: let go of what only a resume would need (e.g. the clients' own state)."""

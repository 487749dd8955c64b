"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning"),
client-algorithm='scaffold': both sides and the method that joins them.

The client's side. Client i keeps a control variate c_i (zeros before it first trains). In a round it trains
from the global model x with every gradient corrected by c - c_i (c: the server's control variate), reaching y,
then takes c_i+ = c_i - c + (x - y) / (S * lr) and replies with y - x and c_i+ - c_i. This is the paper's option II:
with plain SGD, S = K (the local steps) and c_i+ is the mean of the client's gradients along its steps. The
clients here step with momentum beta, which moves a constant gradient g by lr * g * S with
S = sum_{k=1..K} (1 - beta^k) / (1 - beta) (`effective_steps`); dividing by K instead overstates c_i by up to
1 / (1 - beta) and the run diverges (measured: NaN by round 10 on digits, iid, beta 0.9, K 8).

c_i is the client's own state: the server never holds it. It lives on the client's disk beside the run
(`<run>/client_state/<partition>/control-<round>.pt`), one version per round the client trained in, so that
a run resumed from a checkpoint replays each round from the c_i it had then: a round reads the newest version
written before it, and versions older than the one in force at the older of the two checkpoints the run keeps
(fed_app/runs/rundir.py) are deleted.

The server's side: the control variate c, sent to every sampled client with the global model, and its update
c <- c + (1/N) sum_{i in S} (c_i+ - c_i) over the sampled clients S of N (which keeps c the mean of all N
clients' c_i). The model update is SeededFedAvg's: the example-weighted mean of y_i - x, through the server
optimizer if one is set."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from fed_app.config import ConfigError, RunConfig
from fed_app.flower.federation import Federation
from fed_app.flower.payload import Form, Key, SharedFiles, carry, holds, split_flat, take
from fed_app.flower.replies import check_tensors, reply_tag, take_reply
from fed_app.registry import METHODS
from fed_app.runs.files import atomic_torch_save, read_torch
from fed_app.runs.rundir import RunDir
from fed_app.task.seeds import Phase
from fed_app.task.train import client_lr
from strategies.fedavg import PHASES, RoundSum, SeededFedAvg
from strategies.method import FedAvg, TrainReply, TrainRequest, local_update

if TYPE_CHECKING:  # hints only: a report or a config check need not import timm
    from fed_app.flower.loaded_task import LoadedTask, State

VERSION = re.compile(r"control-(\d+)\.pt")


class ControlStore:
    """Every client's control variate versions for one run, under `root/<partition id>/`."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def for_config(cls, cfg: RunConfig) -> ControlStore:
        return cls(RunDir.for_config(cfg, "federated").path / "client_state")

    def versions(self, partition_id: int) -> dict[int, Path]:
        """round -> file of each version this client holds."""
        folder = self.root / str(partition_id)
        found = (VERSION.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
        return {int(m.group(1)): folder / m.group(0) for m in found if m}

    def load(self, partition_id: int, server_round: int) -> Tensor | None:
        """c_i as round `server_round` starts: the newest version written before it (None: never trained)."""
        versions = self.versions(partition_id)
        earlier = [r for r in versions if r < server_round]
        return read_torch(versions[max(earlier)]) if earlier else None

    def save(self, partition_id: int, server_round: int, control: Tensor, checkpointed: int) -> None:
        """Write round `server_round`'s c_i+, replacing versions from that round on (left by a run that stopped
        after them) and dropping those that no resume from the checkpoint at round `checkpointed` can need."""
        folder = self.root / str(partition_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"control-{server_round}.pt"
        # whole or not at all, fsynced, a full disk one sentence; a reader never sees a partial version
        atomic_torch_save(control.cpu(), path, tmp=folder / f".control-{server_round}-{os.getpid()}.tmp")
        versions = self.versions(partition_id)
        in_force = max((r for r in versions if r <= checkpointed), default=None)
        for r, file in versions.items():
            if r > server_round or (in_force is not None and r < in_force):
                file.unlink(missing_ok=True)

    def remove(self) -> None:
        """The run is done: no resume will read these again."""
        shutil.rmtree(self.root, ignore_errors=True)


def effective_steps(steps: int, momentum: float) -> float:
    """How many lr-sized steps of a constant gradient `steps` SGD steps with this (heavy-ball) momentum take:
    the first step moves lr * g, the k-th lr * g * (1 + beta + ... + beta^(k-1))."""
    return float(sum((1 - momentum ** k) / (1 - momentum) for k in range(1, steps + 1))) if momentum else float(steps)


def scaffold_update(task: LoadedTask, global_state: State, partition_id: int, server_round: int,
                    control: Tensor, store: ControlStore, checkpointed: int) -> tuple[State, Tensor, float, int]:
    """One SCAFFOLD client round: (y - x over the whole state, c_i+ - c_i flat over the trainable parameters,
    mean loss, examples); c_i+ saved as this round's version."""
    cfg, shapes = task.cfg, task.trainable_shapes()
    mine = store.load(partition_id, server_round)
    mine = torch.zeros_like(control) if mine is None else mine
    delta, loss, examples = local_update(task, global_state, partition_id, server_round,
                                         correction=split_flat(control - mine, shapes), out=task.reply_buffer())
    moved = torch.cat([delta[n].flatten() for n in shapes])  # y - x over the trainable parameters
    scale = effective_steps(cfg.local_steps, cfg.momentum) * client_lr(cfg, server_round)
    change = -control - moved / scale  # c_i+ - c_i
    store.save(partition_id, server_round, mine + change, checkpointed)
    return delta, change, loss, examples


class ControlSum(RoundSum):
    """RoundSum that also adds up the clients' control changes (in partition order) and, with the round's
    result, moves c by (1/N) times their sum."""

    def __init__(self, strategy: SeededScaffold, examples: dict[int, int]):
        super().__init__(strategy, examples)
        self.changes: Tensor | None = None
        self.checked_changes: dict[int, Tensor] = {}

    def check(self, pid: int, reply: Message) -> None:
        """RoundSum's check, and in a train round the control change: flat over the trainable entries, finite."""
        super().check(pid, reply)
        if self.strategy.training:  # step 0's head rounds carry none
            files = self.strategy.files
            change = take_reply(reply.content, Key.CONTROL_DELTA, files.root if files else None,
                                self.strategy.reply_tags[pid])
            check_tensors(change, {Form.FLAT: (self.strategy.control.shape, torch.float32)})
            self.checked_changes[pid] = change[Form.FLAT]

    def add(self, reply: Message) -> None:
        pid = int(reply.content[Key.METRICS][Key.PARTITION_ID])
        if pid not in self.checked:
            self.check(pid, reply)
        if pid in self.checked_changes:
            change = self.checked_changes.pop(pid)
            self.changes = change.clone() if self.changes is None else self.changes.add_(change)
        super().add(reply)

    def result(self):
        if self.changes is not None:
            self.strategy.control += self.changes / self.strategy.num_clients
        return super().result()


class SeededScaffold(SeededFedAvg):
    """SeededFedAvg whose train rounds carry c and gather the clients' control changes."""

    def __init__(self, *args, trainable: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.control = torch.zeros(trainable)  # c, flat over the trainable parameters in model order

    def configure_train(self, server_round: int, arrays: dict[str, Tensor], config: ConfigRecord,
                        grid=None) -> dict[int, RecordDict]:
        records = super().configure_train(server_round, arrays, config, grid)
        if PHASES[str(config.get(Key.PHASE, ""))] != Phase.TRAIN:
            return records  # step 0's head rounds are plain FedAvg
        control = carry(Key.CONTROL, {Form.FLAT: self.control}, self.files.root if self.files else None)
        for record in records.values():  # one copy (or file) of c, referenced by every record
            record.update(control)
        return records

    def round_sum(self, examples: dict[int, int]) -> RoundSum:
        return ControlSum(self, examples)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server_control": self.control.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.control = state["server_control"].clone()


@METHODS.register("scaffold")
class Scaffold(FedAvg):
    """The method: SeededScaffold on the server, `scaffold_update` on the clients (FedAvg's round where the
    message carries no c: step 0's head rounds); the clients' c_i let go when the run is done."""

    def check(self, cfg: RunConfig) -> None:
        if cfg.optimizer != "sgdm":
            raise ConfigError(f"run-config client-algorithm='scaffold' corrects dense gradients and keeps a dense "
                              f"control variate per client; with optimizer={cfg.optimizer!r} use "
                              f"client-algorithm='fedavg' (or optimizer='sgdm').")

    def strategy(self, cfg: RunConfig, task: LoadedTask, federation: Federation,
                 files: SharedFiles | None) -> SeededScaffold:
        trainable = sum(s.numel() for s in task.trainable_shapes().values())
        return SeededScaffold(*self.strategy_args(cfg, federation, files), trainable=trainable)

    def client_train(self, task: LoadedTask, request: TrainRequest) -> TrainReply:
        if not holds(request.content, Key.CONTROL):
            return super().client_train(task, request)
        config = request.content[Key.CONFIG]
        delta, change, loss, examples = scaffold_update(
            task, request.state, request.partition_id, request.server_round,
            take(request.content, Key.CONTROL)[Form.FLAT], ControlStore.for_config(task.cfg),
            int(config[Key.CHECKPOINTED]))
        return TrainReply(delta, loss, examples, carry(Key.CONTROL_DELTA, {Form.FLAT: change}, request.folder,
                                                       reply_tag(request.content)))

    def finish(self, cfg: RunConfig) -> None:
        ControlStore.for_config(cfg).remove()  # no resume will read the clients' c_i again

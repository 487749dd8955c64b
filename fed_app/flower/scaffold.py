"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning"), the client's
side. Client i keeps a control variate c_i (zeros before it first trains). In a round it trains from the
global model x with every gradient corrected by c - c_i (c: the server's control variate), reaching y, then
takes c_i+ = c_i - c + (x - y) / (S * lr) and replies with y - x and c_i+ - c_i. This is the paper's option II:
with plain SGD, S = K (the local steps) and c_i+ is the mean of the client's gradients along its steps. The
clients here step with momentum beta, which moves a constant gradient g by lr * g * S with
S = sum_{k=1..K} (1 - beta^k) / (1 - beta) (`effective_steps`); dividing by K instead overstates c_i by up to
1 / (1 - beta) and the run diverges (measured: NaN by round 10 on digits, iid, beta 0.9, K 8).
The server's side is strategies/scaffold.py.

c_i is the client's own state: the server never holds it. It lives on the client's disk beside the run
(`<run>/client_state/<partition>/control-<round>.pt`), one version per round the client trained in, so that
a run resumed from its last checkpoint replays each round from the c_i it had then: a round reads the newest
version written before it, and versions older than the one in force at the last checkpoint are deleted."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.flower.loaded_task import LoadedTask, State
from fed_app.runs.rundir import RunDir
from fed_app.task.train import client_lr
from fed_app.flower.wire import split_flat

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
        return torch.load(versions[max(earlier)], weights_only=True) if earlier else None

    def save(self, partition_id: int, server_round: int, control: Tensor, checkpointed: int) -> None:
        """Write round `server_round`'s c_i+, replacing versions from that round on (left by a run that stopped
        after them) and dropping those that no resume from the checkpoint at round `checkpointed` can need."""
        folder = self.root / str(partition_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"control-{server_round}.pt"
        tmp = folder / f".control-{server_round}-{os.getpid()}.tmp"
        torch.save(control.cpu(), tmp)
        os.replace(tmp, path)  # a reader never sees a partial version
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
    delta, loss, examples = task.local_update(global_state, partition_id, server_round,
                                              correction=split_flat(control - mine, shapes), out=task.reply_buffer())
    moved = torch.cat([delta[n].flatten() for n in shapes])  # y - x over the trainable parameters
    scale = effective_steps(cfg.local_steps, cfg.momentum) * client_lr(cfg, server_round)
    change = -control - moved / scale  # c_i+ - c_i
    store.save(partition_id, server_round, mine + change, checkpointed)
    return delta, change, loss, examples

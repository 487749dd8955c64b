"""The run's task loaded in one process: device, data splits, model and client shards, built once and
reused by every message. Clients train (a method's client hook, strategies/method.py) and score with it; the
server evaluates the global model with it and takes the seeded initial model from it. Task code only: no
Flower."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.task.attacks import malicious_partitions
from fed_app.task.batches import BatchTransform
from fed_app.task.data import Dataset, Split, load_dataset
from fed_app.task.partition import client_shards
from fed_app.task.editing import calibrate_masks, fisher_indices, fisher_sums
from fed_app.task.head import (feature_matrix, freeze_head, head_module, logistic_sums, ridge_statistics,
                               temperature_losses)
from fed_app.task.model import ModelSpec, build_model
from fed_app.task.train import autocast, evaluate, resolve_device, training_module
from fed_app.flower.payload import Form, model_state, unpack_masked_state
from fed_app.flower.mask_plan import unpack_masks

log = logging.getLogger(__name__)

State = dict[str, Tensor]


@dataclass
class LoadedTask:
    cfg: RunConfig
    device: torch.device
    data: Dataset
    model: torch.nn.Module
    spec: ModelSpec
    shards: list[Tensor]
    builds: int = 0  # how many times this process loaded a task for this run: 1 in steady state
    _mask_cache: tuple[bytes, dict[str, Tensor]] | None = None
    _base: State | None = None
    _trainer: torch.nn.Module | None = None
    _reply: Tensor | None = None
    _features: dict[int, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)  # head='logistic'

    @property
    def trainer(self) -> torch.nn.Module:
        """The module local training calls (compiled once per process with compile=true)."""
        if self._trainer is None:
            self._trainer = training_module(self.cfg, self.model)
        return self._trainer

    @property
    def train_tf(self) -> BatchTransform:
        return BatchTransform.for_model(self.spec, augment=self.cfg.augment)

    @property
    def eval_tf(self) -> BatchTransform:
        return BatchTransform.for_model(self.spec)

    def _initial(self) -> State:
        """The seeded initial model on CPU, built once per process; shared, never modified."""
        if self._base is None:
            model, _ = build_model(self.cfg, self.data.num_classes)
            self._base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self._base

    def initial_state(self) -> State:
        """A copy of the seeded initial global model, on CPU."""
        return {k: v.clone() for k, v in self._initial().items()}

    def global_state(self, arrays: dict[str, Tensor], masks: dict[str, Tensor] | None) -> State:
        """The global model from a message's tensors: a flat dense buffer, or (global mask) its compact form."""
        if Form.VALUES in arrays:
            return unpack_masked_state(arrays, self._initial(), masks)  # copies the base once
        return model_state(arrays, self.state_shapes())

    def load(self, state: State) -> None:
        self.model.load_state_dict(state)

    def attacks(self, partition_id: int) -> bool:
        """Whether this partition is one of the run's malicious clients (attack != 'none'; fed_app/task/attacks.py)."""
        cfg = self.cfg
        return cfg.attack != "none" and partition_id in malicious_partitions(cfg.seed, cfg.num_clients,
                                                                           cfg.attack_fraction)

    def reply_buffer(self) -> Tensor:
        """A flat float32 buffer of the model's size, kept for the process, for a ClientApp's delta: it is copied
        into the reply (or its file) before the next message comes, and a new 87 MB buffer each round would cost
        its page faults every time."""
        if self._reply is None:
            self._reply = torch.empty(sum(s.numel() for s in self.state_shapes().values()))
        return self._reply

    def ridge_statistics(self, state: State, partition_id: int) -> dict[str, Tensor]:
        self.load(state)
        return ridge_statistics(self.model, self.data.train, self.shards[partition_id], self.eval_tf,
                                self.cfg.eval_batch_size, autocast(self.cfg, self.device), self.data.num_classes)

    def logistic_sums(self, weight: Tensor, bias: Tensor, partition_id: int) -> dict[str, Tensor]:
        """head='logistic': this shard's summed cross-entropy of the head (weight, bias) and its gradient. Step 0
        starts from the seeded initial model, which every client builds itself, so only the head travels; the
        shard's features are computed once per process (an L-BFGS fit asks for these sums 100 times or so)."""
        if partition_id not in self._features:
            self.load(self._initial())
            self._features[partition_id] = feature_matrix(self.model, self.data.train, self.shards[partition_id],
                                                          self.eval_tf, self.cfg.eval_batch_size,
                                                          autocast(self.cfg, self.device))
        return {k: v.cpu() for k, v in logistic_sums(*self._features[partition_id], weight, bias).items()}

    def temperature_losses(self, state: State, partition_id: int) -> Tensor:
        """This shard's summed cross-entropy of the received head at each candidate temperature (float64)."""
        self.load(state)
        head = head_module(self.model)
        return temperature_losses(self.model, self.data.train, self.shards[partition_id], self.eval_tf,
                                  self.cfg.eval_batch_size, autocast(self.cfg, self.device), head.weight.detach(),
                                  head.bias.detach()).cpu()

    def fisher_sums(self, state: State, partition_id: int) -> dict[str, Tensor]:
        """Fisher sums over `fisher-samples` images of this client's shard, on the weights received."""
        self.load(state)
        scored = fisher_indices(self.cfg, self.shards[partition_id], partition_id)
        sums = fisher_sums(self.cfg, self.model, self.data.train, scored, self.eval_tf, partition_id)
        return {n: s.cpu() for n, s in sums.items()}

    def local_masks(self, state: State, partition_id: int) -> dict[str, Tensor]:
        """mask-scope 'local': this client's own calibration, on its own shard only."""
        self.load(state)
        return calibrate_masks(self.cfg, self.model, self.data.train, self.shards[partition_id], self.eval_tf)

    def masks_from_bits(self, bits: np.ndarray) -> dict[str, Tensor]:
        """Masks from their packed bits; the last ones are kept, as a global mask repeats every round."""
        key = hashlib.sha1(bits.tobytes()).digest()
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, unpack_masks(bits, self.trainable_shapes()))
        return self._mask_cache[1]

    def state_shapes(self) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in self.model.state_dict().items()}

    def trainable_shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self.model.named_parameters() if p.requires_grad}

    def shard(self, partition_id: int) -> Split:
        idx = self.shards[partition_id]
        return Split(self.data.train.images[idx], self.data.train.labels[idx])

    def evaluate(self, state: State, split: Split) -> dict[str, float]:
        self.load(state)
        return evaluate(self.model, split, self.eval_tf, self.cfg.eval_batch_size, autocast(self.cfg, self.device))


_CURRENT: LoadedTask | None = None
_BUILDS: collections.Counter[RunConfig] = collections.Counter()  # by run: a session's workers serve many
# The ServerApp builds its task in a thread while the nodes are discovered; a ClientApp answering in the same
# process (tests' InProcessGrid) would otherwise build a second task beside it.
_BUILDING = threading.Lock()


def load_task(cfg: RunConfig) -> LoadedTask:
    """This process's loaded task for `cfg`; built on the first message of a run, reused after."""
    with _BUILDING:
        return _load_task(cfg)


def _load_task(cfg: RunConfig) -> LoadedTask:
    global _CURRENT
    if _CURRENT is None or _CURRENT.cfg != cfg:
        device = resolve_device(cfg)
        data = load_dataset(cfg, device)
        model, spec = build_model(cfg, data.num_classes)
        if cfg.head_frozen:
            freeze_head(model)  # step 0 fits it; afterwards it is neither trained nor masked
        shards = [torch.as_tensor(s, device=device) for s in client_shards(cfg, data.train.labels.cpu().numpy())]
        _BUILDS[cfg] += 1
        _CURRENT = LoadedTask(cfg, device, data, model.to(device), spec, shards, builds=_BUILDS[cfg])
        log.info("process %d loaded its task (%s on %s)", os.getpid(), cfg.model, device)
    return _CURRENT

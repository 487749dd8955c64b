"""ClientApp: thin adapters between Flower messages and the run's method (its client hook, strategies/method.py) or the
task loaded once per process (fed_app/flower/loaded_task.py)."""

from __future__ import annotations

import functools
import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from fed_app.config import ConfigError, RunConfig
from fed_app.flower.payload import (Form, Key, carry, encode, folder_of, gather_trainable, model_payload, model_state,
                                    take)
from fed_app.flower.replies import reply_tag
from fed_app.flower.mask_plan import pack_masks
from fed_app.flower.loaded_task import LoadedTask, load_task
from fed_app.registry import METHODS
from fed_app.task.attacks import UPDATE_ATTACKS, poison_
from strategies.method import TrainRequest
from strategies.privacy import clip_scale

app = ClientApp()


def _partition_id(context: Context, cfg: RunConfig) -> int:
    pid = int(context.node_config[Key.PARTITION_ID])
    if not 0 <= pid < cfg.num_clients:
        raise ConfigError(f"this supernode's partition-id={pid} is outside num-clients={cfg.num_clients}; "
                          f"give supernodes partition ids 0..{cfg.num_clients - 1}.")
    return pid


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, LoadedTask]:
    """The run this message is about (the config it carries; else the context's), this node's partition, and the
    task loaded for that run."""
    if Key.RUN in msg.content:  # a session's simulation serves run after run (fed_app/local/session.py)
        cfg = _parsed(str(msg.content[Key.RUN][Key.CONFIG_JSON]))
    else:
        cfg = RunConfig.from_run_config(context.run_config)
    return cfg, _partition_id(context, cfg), load_task(cfg)


@functools.lru_cache(maxsize=4)  # every message of a run carries the same text
def _parsed(text: str) -> RunConfig:
    return RunConfig.from_run_config(json.loads(text))


def _received_model(msg: Message, task: LoadedTask):
    """The model a query or evaluate message is about, from the message or from the file it references."""
    return model_state(take(msg.content, Key.ARRAYS), task.state_shapes())


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which shard this node owns and how many training images it holds (the task is loaded here, once)."""
    cfg, pid, task = _setup(msg, context)
    info = ConfigRecord({Key.PARTITION_ID: pid, Key.NUM_EXAMPLES: len(task.shards[pid])})
    return Message(RecordDict({Key.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The method's client hook (strategies/method.py; FedAvg: J local steps from the received global model);
    reply with the delta, the example count and the method's extra records (SCAFFOLD: the control change).
    Under a mask (content Key.MASK) only the trainable entries travel back, as one flat vector. A model that
    came as a file (transport='files') is answered with a file in the same folder."""
    cfg, pid, task = _setup(msg, context)
    config = msg.content[Key.CONFIG]
    masks = None
    started = time.perf_counter()
    if Key.MASK in msg.content:
        masks = task.masks_from_bits(msg.content[Key.MASK][Key.BITS].numpy())
    state = task.global_state(take(msg.content, Key.ARRAYS), masks)
    folder = folder_of(msg.content)
    read = time.perf_counter()
    request = TrainRequest(state, pid, int(config[Key.SERVER_ROUND]), msg.content, masks, folder)
    reply = METHODS.get(cfg.client_algorithm).client_train(task, request)
    delta, content = reply.delta, dict(reply.extra)
    sent = {Form.VALUES: gather_trainable(delta, masks)} if masks else delta
    flags = {}
    if not request.head_only:  # step 0's head rounds are outside the attacks and DP (fed_app/task/attacks.py)
        flags = _attack_or_clip_(cfg, task, pid, request.server_round, trained_entries(task, sent),
                                 config.get(Key.CLIPPING_NORM))
    trained = time.perf_counter()
    payload = sent if masks else model_payload(delta, folder is not None)
    content.update(carry(Key.DELTA, payload, folder, reply_tag(msg.content)))  # where the server said
    metrics = MetricRecord({Key.TRAIN_LOSS: reply.loss, Key.NUM_EXAMPLES: reply.examples, Key.PARTITION_ID: pid,
                            Key.TASK_BUILDS: task.builds, Key.TIME_READ: read - started,
                            Key.TIME_TRAIN: trained - read, Key.TIME_WRITE: time.perf_counter() - trained})
    metrics.update(flags)
    content[Key.METRICS] = metrics
    return Message(RecordDict(content), reply_to=msg)


def trained_entries(task: LoadedTask, sent: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a client trained, as it travels: a mask's flat trainable entries, or the dense update's trainable
    tensors (views). Not a frozen head: an attacker's noise there would reach a part of the model that the
    masked arm's attacker cannot, and a Gaussian attacker's scale would count entries that nobody trains."""
    if Form.VALUES in sent:
        return sent
    return {n: sent[n] for n in task.trainable_shapes()}


def _attack_or_clip_(cfg: RunConfig, task: LoadedTask, pid: int, server_round: int, delta: dict[str, Tensor],
                     clipping_norm: float | None) -> dict[str, int]:
    """A malicious client (attack != 'none') replaces `delta`, what it trained (`trained_entries`), by its attack;
    under client-side DP an honest one clips it to the round's `clipping_norm` (fed_app/task/attacks.py,
    strategies/privacy.py). In place: the reply carries these tensors. The reply's flags: whether it attacked,
    whether it was clipped."""
    flags = {}
    attacks = task.attacks(pid)
    if cfg.attack != "none":
        flags[Key.ATTACKER] = int(attacks)
        if attacks and cfg.attack in UPDATE_ATTACKS:
            poison_(cfg.attack, cfg.attack_scale, delta, cfg.seed, server_round, pid)
    if clipping_norm is not None:  # client-side DP
        scale = 1.0 if attacks else clip_scale(delta, float(clipping_norm))  # an attacker does not clip
        if scale < 1.0:
            for value in delta.values():
                value.mul_(scale)
        flags[Key.CLIPPED] = int(scale < 1.0)
    return flags


@app.query("ridge")
def ridge(msg: Message, context: Context) -> Message:
    """Step 0, head='ridge': X^T X, X^T Y of this shard's backbone features (they add up across clients)."""
    _, pid, task = _setup(msg, context)
    stats = task.ridge_statistics(_received_model(msg, task), pid)
    metrics = MetricRecord({Key.NUM_EXAMPLES: int(stats["count"]), Key.PARTITION_ID: pid})
    return Message(RecordDict({Key.STATS: ArrayRecord({k: stats[k] for k in ("xtx", "xty")}), Key.METRICS: metrics}),
                   reply_to=msg)


@app.query("logistic")
def logistic(msg: Message, context: Context) -> Message:
    """Step 0, head='logistic': this shard's cross-entropy sum of the received head and its gradient (float64)."""
    _, pid, task = _setup(msg, context)
    head = take(msg.content, Key.ARRAYS)
    sums = task.logistic_sums(head[Key.WEIGHT], head[Key.BIAS], pid)
    metrics = MetricRecord({Key.NUM_EXAMPLES: len(task.shards[pid]), Key.PARTITION_ID: pid})
    return Message(RecordDict({Key.SUMS: encode(sums), Key.METRICS: metrics}), reply_to=msg)


@app.query("temperature")
def temperature(msg: Message, context: Context) -> Message:
    """Step 0, head='ridge': this shard's cross-entropy sums of the solved head at each candidate temperature."""
    _, pid, task = _setup(msg, context)
    losses = task.temperature_losses(_received_model(msg, task), pid)
    metrics = MetricRecord({Key.NUM_EXAMPLES: len(task.shards[pid]), Key.PARTITION_ID: pid})
    return Message(RecordDict({Key.LOSSES: ArrayRecord({Key.SUMS: losses}), Key.METRICS: metrics}), reply_to=msg)


@app.query("fisher")
def fisher(msg: Message, context: Context) -> Message:
    """Calibration: Fisher sums of this shard on the weights received (already damped by the server)."""
    cfg, pid, task = _setup(msg, context)
    sums = task.fisher_sums(_received_model(msg, task), pid)
    metrics = MetricRecord({Key.NUM_EXAMPLES: min(cfg.fisher_samples, len(task.shards[pid])), Key.PARTITION_ID: pid})
    # float32 on the wire (half of float64's upload: every client sends one score per backbone weight each
    # calibration round); the server adds them up in float64. Masks are unchanged (tested against float64 sums).
    flat = torch.cat([s.flatten() for s in sums.values()]).float()
    return Message(RecordDict({Key.SUMS: ArrayRecord({Form.FLAT: flat}), Key.METRICS: metrics}), reply_to=msg)


@app.query("local_mask")
def local_mask(msg: Message, context: Context) -> Message:
    """mask-scope 'local': calibrate this client's own mask on its own shard; reply with it as packed bits."""
    _, pid, task = _setup(msg, context)
    masks = task.local_masks(_received_model(msg, task), pid)
    bits = ArrayRecord({Key.BITS: torch.from_numpy(pack_masks(masks))})
    return Message(RecordDict({Key.MASK: bits, Key.METRICS: MetricRecord({Key.PARTITION_ID: pid})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The received model's loss and accuracy on this client's own shard."""
    cfg, pid, task = _setup(msg, context)
    result = task.evaluate(_received_model(msg, task), task.shard(pid))
    metrics = MetricRecord({"loss": result["loss"], "accuracy": result["accuracy"],
                            Key.NUM_EXAMPLES: len(task.shards[pid]), Key.PARTITION_ID: pid})
    return Message(RecordDict({Key.METRICS: metrics}), reply_to=msg)

"""Step 0 and mask calibration in FL, server side: federated ridge or head rounds, global Fisher masks."""

from __future__ import annotations

import itertools
import logging

import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from fed_app.config import RunConfig
from fed_app.task.head import TEMPERATURES, fit_logistic, fit_temperature, head_name, logistic_sums, solve_ridge
from fed_app.task.seeds import Phase, sample_partitions
from fed_app.flower.payload import Form, Key, encode, split_flat
from fed_app.flower.replies import query_check, take_reply
from fed_app.flower.mask_plan import unpack_masks
from fed_app.flower.loaded_task import State, LoadedTask
from masking.calibrate import Masks, calibrate
from strategies.fedavg import SeededFedAvg

log = logging.getLogger(__name__)


def federated_head(cfg: RunConfig, strategy: SeededFedAvg, task: LoadedTask, state: State) -> tuple[State, dict]:
    """head='logistic': an L-BFGS fit on the clients' summed cross-entropy and gradient (each evaluation one query
    of every client, carrying only the head), equal to the centralized fit on the union of the shards;
    head='ridge': every client's X^T X and X^T Y summed, solved once (equal to ridge on the union), then
    every client's cross-entropy sums at each candidate temperature summed, and the best one folded into the
    head (equal to the centralized fit); head='train': head-rounds FedAvg rounds in which clients train only
    the head. Then it stays frozen (unless freeze-head=false). Also what step 0 found, for the round-0 row."""
    everyone = list(range(cfg.num_clients))
    dim, classes = state[f"{head_name(task.model)}.weight"].shape[1], task.data.num_classes
    if cfg.head == "logistic":

        def client_sums(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
            record = RecordDict({Key.ARRAYS: encode({Key.WEIGHT: weight, Key.BIAS: bias})})
            form = logistic_sums(torch.zeros(1, dim, dtype=torch.float64), torch.zeros(1, dtype=torch.long),
                                 weight, bias)  # what a client's sums look like: their names, shapes, dtypes
            check = query_check(Key.SUMS, {k: (v.shape, v.dtype) for k, v in form.items()})
            replies = strategy.federation.exchange(0, f"{MessageType.QUERY}.logistic",
                                                   {p: record for p in everyone}, check=check).replies
            total = {k: v.clone() for k, v in take_reply(replies[0].content, Key.SUMS, None, "").items()}
            for reply in replies[1:]:  # in partition order: the same float sums every time (inside the messages)
                for k, v in take_reply(reply.content, Key.SUMS, None, "").items():
                    total[k] += v
            return total

        weight, bias, found = fit_logistic(client_sums, dim, task.data.num_classes, cfg.logistic_lambda,
                                           cfg.head_iterations)
        w, b = f"{head_name(task.model)}.weight", f"{head_name(task.model)}.bias"
        return {**state, w: weight.to(state[w].dtype), b: bias.to(state[b].dtype)}, found
    if cfg.head == "ridge":
        form = {"xtx": (torch.Size([dim + 1, dim + 1]), torch.float64),
                "xty": (torch.Size([dim + 1, classes]), torch.float64)}
        replies = strategy.send_model(0, f"{MessageType.QUERY}.ridge", state, everyone,
                                      check=query_check(Key.STATS, form)).replies
        parts = [r.content[Key.STATS].to_torch_state_dict() for r in replies]  # in partition order
        stats = {k: sum(p[k] for p in parts) for k in ("xtx", "xty")}
        weight, bias = solve_ridge(stats, cfg.ridge_lambda)
        w, b = f"{head_name(task.model)}.weight", f"{head_name(task.model)}.bias"
        state = {**state, w: weight.to(state[w].dtype), b: bias.to(state[b].dtype)}
        if not cfg.ridge_calibrate:
            return state, {}
        form = {Key.SUMS: (TEMPERATURES.shape, torch.float64)}
        replies = strategy.send_model(0, f"{MessageType.QUERY}.temperature", state, everyone,
                                      check=query_check(Key.LOSSES, form)).replies
        losses = [r.content[Key.LOSSES].to_torch_state_dict()[Key.SUMS] for r in replies]
        temperature = fit_temperature(sum(losses[1:], losses[0]))  # in partition order
        state = {**state, w: state[w] * temperature, b: state[b] * temperature}
        return state, {"head_temperature": temperature}
    if cfg.head == "train":
        for r in range(1, cfg.head_rounds + 1):
            state, metrics = strategy.advance(r, state, ConfigRecord({Key.PHASE: "head"}))
            log.info("head round %d/%d  train_loss %.4f", r, cfg.head_rounds, metrics["train_loss"])
    return state, {}


def federated_masks(cfg: RunConfig, strategy: SeededFedAvg, task: LoadedTask, state: State) -> Masks:
    """TaLoS calibration where each round's Fisher sums come from the clients: the server sends the
    soft-masked (damped) global model to a `calibration-fraction` of them and adds their sums up."""
    task.load(state)
    rounds = itertools.count(1)
    size = sum(s.numel() for s in task.trainable_shapes().values())  # one float32 score per trainable entry

    def client_fisher(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        r = next(rounds)
        pids = sample_partitions(cfg.seed, r, cfg.num_clients, cfg.calibration_clients, Phase.CALIBRATION)
        replies = strategy.send_model(r, f"{MessageType.QUERY}.fisher", model.state_dict(), pids,
                                      check=query_check(Key.SUMS, {Form.FLAT: (torch.Size([size]), torch.float32)})).replies
        total = reply_flat(replies[0]).double()  # float32 scores, summed in float64
        for reply in replies[1:]:  # in partition order: the same float sums every time
            total += reply_flat(reply)
        return {n: s.to(task.device) for n, s in split_flat(total, task.trainable_shapes()).items()}

    def reply_flat(reply) -> torch.Tensor:
        return reply.content[Key.SUMS].to_torch_state_dict()[Form.FLAT]

    masks = calibrate(task.model, cfg.mask_rule, cfg.sparsity, cfg.calibration_rounds, client_fisher,
                      damping=cfg.mask_damping, seed=cfg.seed, per_layer=cfg.mask_threshold == "per-layer")
    return {n: m.cpu() for n, m in masks.items()}


def federated_local_masks(cfg: RunConfig, strategy: SeededFedAvg, task: LoadedTask, state: State) -> dict[int, Masks]:
    """mask-scope 'local': every client calibrates its own mask on its own shard; partition id -> mask."""
    everyone = list(range(cfg.num_clients))
    shapes = task.trainable_shapes()
    size = -(-sum(s.numel() for s in shapes.values()) // 8)  # packed bits
    replies = strategy.send_model(0, f"{MessageType.QUERY}.local_mask", state, everyone,
                                  check=query_check(Key.MASK, {Key.BITS: (torch.Size([size]), torch.uint8)})).replies
    return {int(r.content[Key.METRICS][Key.PARTITION_ID]):
            unpack_masks(r.content[Key.MASK][Key.BITS].numpy(), shapes) for r in replies}

"""SeededFedAvg: Flower's FedAvg with (seed, round)-keyed sampling over partition ids, retries of failed
clients, and example-weighted averaging of client deltas in torch."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fed_app.transport import SharedFiles, TransportError, carry, discard, payload_bytes, take
from masking.payload import add_trainable_, pack_masks

log = logging.getLogger(__name__)


TRAIN_STREAM, HEAD_STREAM, CALIBRATION_STREAM, EVALUATE_STREAM = 0, 1, 2, 3  # sampling streams: one per phase
PHASE_STREAMS = {"": TRAIN_STREAM, "head": HEAD_STREAM}


class RoundFailedError(RuntimeError):
    """Fewer clients answered than were sampled, after the allowed retries."""


def sample_partitions(seed: int, server_round: int, num_clients: int, per_round: int, stream: int = 0) -> list[int]:
    """The partition ids of a round: a function of (seed, round, stream) alone, so resume repeats it.
    Stream 0 is training; other phases (head rounds, calibration) use their own stream."""
    rng = np.random.default_rng([seed, server_round] if stream == 0 else [seed, server_round, stream])
    return sorted(int(p) for p in rng.choice(num_clients, size=per_round, replace=False))


def weighted_average(deltas: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """sum_i w_i * delta_i / sum_i w_i per tensor, accumulated in float32 in the given order."""
    total = float(sum(weights))
    out = {}
    for name in deltas[0]:
        acc = torch.zeros_like(deltas[0][name], dtype=torch.float32)
        for delta, w in zip(deltas, weights):
            acc.add_(delta[name].float(), alpha=w / total)
        out[name] = acc
    return out


def masked_average(deltas: list[dict[str, Tensor]], masks: list[dict[str, Tensor]],
                   weights: list[float]) -> dict[str, Tensor]:
    """Each entry averaged over the clients whose mask trains it: sum_i w_i m_i d_i / sum_i w_i m_i (float32, in
    the given order); 0 where no client trains it. (mask-scope 'local': a client's frozen entries are not a
    zero update, so an entry trained by one client of ten gets that client's update, not a tenth of it.)"""
    out = {}
    for name in deltas[0]:
        total = torch.zeros_like(deltas[0][name], dtype=torch.float32)
        weight = torch.zeros_like(total)
        for delta, mask, w in zip(deltas, masks, weights):
            total.add_(delta[name].float() * mask[name], alpha=w)
            weight.add_(mask[name].float(), alpha=w)
        out[name] = torch.where(weight > 0, total / weight.clamp_min(1e-30), 0.0)
    return out


class SeededFedAvg(FedAvg):
    """FedAvg whose sampling, failure handling and aggregation are reproducible across resume."""

    def __init__(self, seed: int, num_clients: int, per_round: int, nodes: dict[int, int],
                 max_retries: int, timeout: float, files: SharedFiles | None = None):
        super().__init__(fraction_train=per_round / num_clients, fraction_evaluate=0.0,
                         min_available_nodes=num_clients)
        self.seed, self.num_clients, self.per_round = seed, num_clients, per_round
        self.nodes = nodes  # partition id -> node id
        self.partition_of = {node: pid for pid, node in nodes.items()}
        self.max_retries, self.timeout = max_retries, timeout
        self.files = files  # transport='files': train payloads go through this folder, not the messages
        self.bytes_sent = self.bytes_received = 0
        self.mask_records: dict[int, ArrayRecord] = {}  # partition id -> the mask its train messages carry
        self.client_masks: dict[int, dict[str, Tensor]] | None = None  # mask-scope 'local': each client's own

    def use_masks(self, masks: dict[str, Tensor] | None, client_masks: dict[int, dict[str, Tensor]] | None) -> None:
        """Train messages carry the global mask, or each client's own (then replies are scattered per client)."""
        if masks is not None:
            record = ArrayRecord({"bits": torch.from_numpy(pack_masks(masks))})
            self.mask_records = {p: record for p in range(self.num_clients)}
        if client_masks is not None:
            self.mask_records = {p: ArrayRecord({"bits": torch.from_numpy(pack_masks(m))})
                                 for p, m in client_masks.items()}
            self.client_masks = client_masks

    def configure_train(self, server_round: int, arrays: dict[str, Tensor], config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Train messages to the sampled clients: the model `arrays` (inside each message, or written once
        as a file they all reference), the config, and each client's mask if any."""
        stream = PHASE_STREAMS[str(config.get("phase", ""))]
        pids = sample_partitions(self.seed, server_round, self.num_clients, self.per_round, stream)
        config["server-round"] = server_round
        base = {**carry(self.arrayrecord_key, arrays, self.files.root if self.files else None),
                self.configrecord_key: config}
        if stream != TRAIN_STREAM or not self.mask_records:
            return self._messages({p: RecordDict(base) for p in pids}, MessageType.TRAIN)
        return self._messages({p: RecordDict({**base, "mask": self.mask_records[p]}) for p in pids},
                              MessageType.TRAIN)

    def _messages(self, records: dict[int, RecordDict], message_type: str) -> list[Message]:
        for record in records.values():
            self.bytes_sent += sum(payload_bytes(r) for r in record.values())
        return [Message(record, self.nodes[p], message_type) for p, record in records.items()]

    def train_round(self, grid: Grid, server_round: int, arrays: dict[str, Tensor],
                    config: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
        """One FedAvg round over the sampled clients (retrying failures), aggregated."""
        self.bytes_sent = self.bytes_received = 0
        messages = list(self.configure_train(server_round, arrays, config, grid))
        pids = [self.partition_of[m.metadata.dst_node_id] for m in messages]
        try:
            replies = self.collect(grid, server_round, messages, pids)
        except RoundFailedError as err:
            if self.files is None or TransportError.__name__ not in str(err):
                raise
            # a client cannot see the server's files (another machine): models go inside messages from now on
            log.warning("round %d: %s; sending models inside the messages from now on", server_round, err)
            self.files = None
            return self.train_round(grid, server_round, arrays, config)
        finally:
            discard(messages[0].content)  # this round's global model file, if it went as one
        return self.aggregate_train(server_round, replies)

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, fraction: float) -> MetricRecord:
        """A `fraction` of the clients evaluate the global model on their own shards: example-weighted means."""
        pids = sample_partitions(self.seed, server_round, self.num_clients,
                                 max(1, round(fraction * self.num_clients)), EVALUATE_STREAM)
        messages = self._messages({p: RecordDict({self.arrayrecord_key: arrays}) for p in pids}, MessageType.EVALUATE)
        metrics = [m.content["metrics"] for m in self.collect(grid, server_round, messages, pids)]
        total = sum(float(m["num-examples"]) for m in metrics)
        return MetricRecord({k: sum(float(m[k]) * float(m["num-examples"]) for m in metrics) / total
                             for k in ("loss", "accuracy")})

    def query(self, grid: Grid, server_round: int, action: str, record: RecordDict,
              pids: list[int]) -> list[Message]:
        """A `query.<action>` to these clients (with the same retry policy); replies in partition order."""
        self.bytes_sent = self.bytes_received = 0
        messages = self._messages({p: record for p in pids}, f"{MessageType.QUERY}.{action}")
        return self.collect(grid, server_round, messages, pids)

    def collect(self, grid: Grid, server_round: int, messages: list[Message], pids: list[int]) -> list[Message]:
        """Send, resend to the clients that failed (up to max-retries); every client's reply, in pid order."""
        replies: dict[int, Message] = {}
        reasons: dict[int, str] = {}
        for attempt in range(self.max_retries + 1):
            for reply in grid.send_and_receive(messages, timeout=self.timeout):
                pid = self.partition_of[reply.metadata.src_node_id]
                if reply.has_error():
                    reasons[pid] = reply.error.reason
                else:
                    replies[pid] = reply
            missing = [p for p in pids if p not in replies]
            if not missing:
                break
            for p in missing:
                reasons.setdefault(p, f"no reply within round-timeout={self.timeout}s")
            log.warning("round %d: clients %s failed (attempt %d/%d): %s", server_round, missing, attempt + 1,
                        self.max_retries + 1, "; ".join(f"{p}: {reasons[p]}" for p in missing))
            sent = {self.partition_of[m.metadata.dst_node_id]: m for m in messages}
            messages = self._messages({p: sent[p].content for p in missing}, messages[0].metadata.message_type)
        else:
            raise RoundFailedError(
                f"round {server_round}: clients {missing} failed after {self.max_retries} retries "
                f"({reasons[missing[0]]}); rerun the same command to resume, or raise max-retries."
            )
        self.bytes_received += sum(payload_bytes(r) for m in replies.values() for r in m.content.values())
        return [replies[p] for p in sorted(pids)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The example-weighted mean delta (dense, or the flat trainable entries), in partition-id order,
        and the weighted train loss."""
        contents = sorted((m.content for m in replies), key=lambda c: int(c["metrics"]["partition-id"]))
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        deltas = [take(c, "delta", delete=True) for c in contents]
        if self.client_masks is not None:  # each client's trainable entries, scattered to full size
            masks = [self.client_masks[int(c["metrics"]["partition-id"])] for c in contents]
            delta = masked_average([self._scatter(d["values"], m) for d, m in zip(deltas, masks)], masks, weights)
        else:
            delta = weighted_average(deltas, weights)
        loss = sum(w * float(c["metrics"]["train_loss"]) for w, c in zip(weights, contents)) / sum(weights)
        builds = max(int(c["metrics"].get("worker-builds", 0)) for c in contents)  # 1: built once per process
        return ArrayRecord(delta), MetricRecord({"train_loss": loss, "clients": len(contents), "worker_builds": builds})

    @staticmethod
    def _scatter(values: Tensor, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        full = {n: torch.zeros(m.shape) for n, m in masks.items()}
        add_trainable_(full, values, masks)
        return full

"""SeededFedAvg: FedAvg with (seed, round)-keyed sampling over partition ids and example-weighted
averaging of client deltas in torch, summed one client at a time in partition order. Reaching the clients
(messages, retries, bytes) is fed_app.flower.federation's."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import Tensor

from fed_app.config import RunConfig
from fed_app.flower.federation import Federation, RoundFailedError
from fed_app.task.seeds import Phase, sample_partitions
from fed_app.flower.payload import (Form, Key, PayloadRoomError, SharedFiles, TransportError, add_trainable_,
                                    apply_update, carry, discard, flat_state, masked_state, model_payload, split_flat)
from fed_app.flower.replies import check_evaluation, check_metrics, check_tensors, take_reply
from fed_app.flower.mask_plan import MaskPlan, pack_masks
from fed_app.registry import AGGREGATIONS
from strategies.mean import masked_average, weighted_average  # noqa: F401 (re-exported: __all__)
from strategies.privacy import DpFedAvg, clipped
from strategies.server_opt import ServerOptimizer

log = logging.getLogger(__name__)

__all__ = ["SeededFedAvg", "RoundFailedError", "sample_partitions", "weighted_average", "masked_average"]

PHASES = {"": Phase.TRAIN, "head": Phase.HEAD}  # config Key.PHASE -> whose sampling stream


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op threads at 1 inside the block. The server adds replies up while the clients train, on
    this machine's cores in a simulation: an add spread over two threads, one of them waiting for a busy core,
    took 21-43 ms of CPU per ViT-S/16 update against 9 ms on one thread (2-core CPU, both cores training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RoundSum:
    """One round's replies added up one at a time, in partition order, each delta read, added and dropped:
    the example-weighted mean update (dense, or the flat trainable entries) and the weighted train loss. The
    weights (each partition's training images, as its node reported them) are known before the first reply."""

    def __init__(self, strategy: SeededFedAvg, examples: dict[int, int]):
        self.strategy, self.examples = strategy, examples
        # Under DP every client weighs the same: the noise covers one client's clipped update in a mean of n
        # (Flower's accounted DP requires equal weights); with equal shards this is the example-weighted mean.
        self.weights = examples if strategy.privacy is None else dict.fromkeys(examples, 1)
        self.local = strategy.plan is not None and strategy.plan.shared is None  # mask-scope 'local'
        self.total = strategy.aggregator(sum(self.weights.values()), masked=self.local)
        self.metrics: list[MetricRecord] = []
        self.checked: dict[int, dict[str, Tensor]] = {}  # partition -> its update, checked, until it is added

    def check(self, pid: int, reply: Message) -> None:
        """Raise BadReplyError unless partition `pid`'s reply can count: its metrics are its own (check_metrics), and
        its update is
        where the server said (fed_app/flower/replies.py) and has the names, shapes and dtypes the round's form
        gives (`SeededFedAvg.reply_form`), every value finite."""
        check_metrics(reply.content.get(Key.METRICS), pid, self.examples[pid])
        files = self.strategy.files
        delta = take_reply(reply.content, Key.DELTA, files.root if files else None, self.strategy.reply_tags[pid])
        check_tensors(delta, self.strategy.reply_form(pid, flat=isinstance(delta, dict) and Form.FLAT in delta))
        self.checked[pid] = delta

    def add(self, reply: Message) -> None:
        content = reply.content
        metrics = content[Key.METRICS]
        pid = int(metrics[Key.PARTITION_ID])
        if pid not in self.checked:  # added without an exchange's check (a caller of its own)
            self.check(pid, reply)
        delta = self.checked.pop(pid)
        privacy = self.strategy.privacy
        if privacy is not None and privacy.clips_on_server:
            delta, was_clipped = clipped(delta, privacy.clipping_norm)
            metrics[Key.CLIPPED] = int(was_clipped)
        if not self.local:
            self.total.add(delta, self.weights[pid])
        else:  # each client's trainable entries, scattered to full size
            mask = self.strategy.plan.per_partition[pid]
            self.total.add(SeededFedAvg._scatter(delta[Form.VALUES], mask), self.weights[pid], mask)
        self.metrics.append(metrics)

    def result(self) -> tuple[dict[str, Tensor], MetricRecord]:
        weights = [float(m[Key.NUM_EXAMPLES]) for m in self.metrics]
        loss = sum(w * float(m[Key.TRAIN_LOSS]) for w, m in zip(weights, self.metrics)) / sum(weights)
        builds = max(int(m.get(Key.TASK_BUILDS, 0)) for m in self.metrics)  # 1: built once per process
        phases = {f"time_client_{k[5:]}": sum(float(m.get(k, 0.0)) for m in self.metrics)
                  for k in (Key.TIME_READ, Key.TIME_TRAIN, Key.TIME_WRITE)}  # summed over the clients
        counts = {row: sum(int(m[key]) for m in self.metrics) for row, key in (("attackers", Key.ATTACKER),
                                                                                  ("clipped", Key.CLIPPED))
                  if key in self.metrics[0]}  # attack != 'none', dp != 'none': how many of the round's clients
        return self.total.result(), MetricRecord({"train_loss": loss, "clients": len(self.metrics),
                                                  "task_builds": builds, **phases, **counts})


class SeededFedAvg:
    """FedAvg whose sampling and aggregation are reproducible across resume: configure_train samples and builds
    each client's record, RoundSum aggregates reply by reply, advance runs one round.

    Not a subclass of Flower's Strategy, on purpose: Strategy.start owns the whole loop and takes the model as one
    ArrayRecord, while fedit's run loop (fed_app/runs/run_loop.py) owns step 0, calibration, checkpoints and resume,
    and sends the model as a file or as views of one buffer (an ArrayRecord copies it into bytes). Flower's
    strategy wrappers therefore cannot wrap it; its messages keep Flower's FedAvg record names ("arrays",
    "config"), so a Flower ClientApp reads them as it would FedAvg's."""

    def __init__(self, seed: int, num_clients: int, per_round: int, federation: Federation,
                 files: SharedFiles | None = None, aggregation: str | Callable = "fedavg",
                 server_optimizer: ServerOptimizer | None = None):
        self.seed, self.num_clients, self.per_round = seed, num_clients, per_round
        self.federation = federation
        # (total weight, masked) -> .add(delta, w, mask), .result(): a registered name, or aggregation_rule(cfg)
        self.aggregator = AGGREGATIONS.get(aggregation) if isinstance(aggregation, str) else aggregation
        self.files = files  # transport='files': train payloads go through this folder, not the messages
        self.plan: MaskPlan | None = None  # sparse runs: which entries each partition trains
        self.mask_records: dict[int, ArrayRecord] = {}  # partition id -> the mask its train messages carry
        self.compact = False  # send only what can differ from the seeded initial model
        self.server_optimizer = server_optimizer  # None: the mean delta is added as it is (FedAvg)
        self.privacy: DpFedAvg | None = None  # dp != 'none': clipping and noise (strategies/privacy.py)
        self.reply_tags: dict[int, str] = {}  # partition -> the name its train reply's files must have
        self.form: dict[str, tuple[torch.Size, torch.dtype]] = {}  # the round's model: a dense reply's tensors
        self.training = self.masked_form = False  # a train round (not step 0's head); one under masks

    def state_dict(self) -> dict:
        """What the strategy carries from round to round, for the run's checkpoint (beside the model)."""
        opt, privacy = self.server_optimizer, self.privacy
        return {**({"server_optimizer": opt.state_dict()} if opt is not None else {}),
                **({"privacy": privacy.state_dict()} if privacy is not None and privacy.adaptive else {})}

    def load_state_dict(self, state: dict) -> None:
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(state["server_optimizer"])
        if self.privacy is not None and self.privacy.adaptive:
            self.privacy.load_state_dict(state["privacy"])

    def use_masks(self, plan: MaskPlan | None, compact: bool = False) -> None:
        """Train messages carry each partition's mask (one record for a global mask); with `compact`, the
        global model goes down as its trainable entries and the parameters outside the mask."""
        self.plan, self.compact = plan, compact and plan is not None and plan.shared is not None
        records: dict[int, ArrayRecord] = {}  # by mask object: a global mask is packed once
        for pid, masks in (plan.per_partition.items() if plan else []):
            if id(masks) not in records:
                records[id(masks)] = ArrayRecord({Key.BITS: torch.from_numpy(pack_masks(masks))})
            self.mask_records[pid] = records[id(masks)]

    def advance(self, server_round: int, state: dict[str, Tensor],
                config: ConfigRecord | None = None) -> tuple[dict[str, Tensor], MetricRecord]:
        """One round from the global `state`: its payload (dense, or compact under a global mask), the train
        round, and the averaged update added in place; the new state and the round's metrics."""
        config = ConfigRecord() if config is None else config
        training = PHASES[str(config.get(Key.PHASE, ""))] == Phase.TRAIN
        shared = self.plan.shared if self.plan is not None and training else None
        compact = shared is not None and self.compact
        payload = masked_state(state, shared) if compact else model_payload(state, self.files is not None)
        self.training, self.form = training, {n: (t.shape, t.dtype) for n, t in state.items()}
        update, metrics = self.train_round(server_round, payload, config)
        started = time.perf_counter()
        if self.server_optimizer is not None and training:  # dense runs only (RunConfig checks)
            x = flat_state(state)[Form.FLAT]  # the global buffer itself (a copy if state is not one buffer)
            mean = update[Form.FLAT] if Form.FLAT in update else flat_state(update)[Form.FLAT]
            self.server_optimizer.step(x, mean, server_round)
            state = split_flat(x, {n: t.shape for n, t in state.items()})
        else:
            state = apply_update(state, update, shared)
        metrics["time_apply"] = time.perf_counter() - started
        return state, metrics

    def configure_train(self, server_round: int, arrays: dict[str, Tensor], config: ConfigRecord,
                        grid=None) -> dict[int, RecordDict]:
        """Each sampled partition's train record: the model `arrays` (inside the record, or written once as a
        file they all reference), the config, and its mask if any."""
        phase = PHASES[str(config.get(Key.PHASE, ""))]
        pids = (self.privacy.sample(self.num_clients, self.per_round) if self.privacy is not None
                and phase == Phase.TRAIN else None)  # dp-randomness='os': a cohort nobody can replay
        pids = pids or sample_partitions(self.seed, server_round, self.num_clients, self.per_round, phase)
        config[Key.SERVER_ROUND] = server_round
        if self.privacy is not None and not self.privacy.clips_on_server:  # the clients clip at this round's C
            config[Key.CLIPPING_NORM] = self.privacy.clipping_norm
        base = {**carry(Key.ARRAYS, arrays, self.files.root if self.files else None), Key.CONFIG: config}
        self.reply_tags = {p: uuid.uuid4().hex for p in pids}  # the only file names the replies may use
        masks = phase == Phase.TRAIN and bool(self.mask_records)
        self.masked_form = masks  # the replies: the masks' trainable entries
        self.form = self.form or {n: (t.shape, t.dtype) for n, t in arrays.items()}  # a caller without advance
        return {p: RecordDict({**base, Key.REPLY: ConfigRecord({Key.TAG: self.reply_tags[p]}),
                               **({Key.MASK: self.mask_records[p]} if masks else {})}) for p in pids}

    def reply_form(self, pid: int, flat: bool) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """The tensors a train reply of this round must hold, as the client builds them (client_app.train): a
        mask's trainable entries (flat float32), or the dense update, `flat` (as files carry it: one float32
        vector of the model's size) or by name (as messages do; a round that fell back from files mid-way may
        send either)."""
        if self.masked_form:
            count = sum(int(m.sum()) for m in self.plan.per_partition[pid].values())
            return {Form.VALUES: (torch.Size([count]), torch.float32)}
        if flat and Form.FLAT not in self.form:
            return {Form.FLAT: (torch.Size([sum(s.numel() for s, _ in self.form.values())]), torch.float32)}
        return self.form

    def send_model(self, server_round: int, message_type: str, state: dict[str, Tensor], pids: list[int],
                   check: Callable[[int, Message], None] | None = None):
        """The model `state` to these partitions, the same record for all (step-0 and calibration queries,
        client evaluation): it goes the way train payloads go, so with transport='files' it is written once for
        all of them, not copied into every message (step 0 of a ridge head asks all K clients twice). `check`
        sees each reply before it counts (fed_app/flower/replies.py)."""
        folder = self.files.root if self.files else None
        try:
            content = carry(Key.ARRAYS, model_payload(state, folder is not None), folder)
        except PayloadRoomError as err:  # a full /dev/shm
            self._messages_from_now_on(err)
            return self.send_model(server_round, message_type, state, pids, check)
        try:
            return self.federation.exchange(server_round, message_type, {p: RecordDict(content) for p in pids},
                                            check=check)
        except RoundFailedError as err:
            if not self._files_unreadable(err):
                raise
            return self.send_model(server_round, message_type, state, pids, check)
        finally:
            discard(RecordDict(content))

    def _files_unreadable(self, err: RoundFailedError) -> bool:
        """Whether clients failed because they cannot read the server's files (another machine); if so, models
        go inside the messages from now on and the exchange is to be redone. So too when clients had no room to
        write their updates (PayloadRoomError, a TransportError)."""
        if self.files is None or not any(e.__name__ in str(err) for e in (TransportError, PayloadRoomError)):
            return False
        self._messages_from_now_on(err)
        return True

    def _messages_from_now_on(self, err: Exception) -> None:
        log.warning("%s; sending models inside the messages from now on", err)
        self.files.empty()  # what the failed exchange left there holds room a full /dev/shm lacks
        self.files = None

    def train_round(self, server_round: int, arrays: dict[str, Tensor],
                    config: ConfigRecord) -> tuple[dict[str, Tensor], MetricRecord]:
        """One FedAvg round over the sampled clients (retrying failures), aggregated as the replies come; its
        metrics include the payload bytes it moved each way and the seconds of each phase."""
        started = time.perf_counter()
        try:
            records = self.configure_train(server_round, arrays, config)
        except PayloadRoomError as err:  # a full /dev/shm
            self._messages_from_now_on(err)
            return self.train_round(server_round, arrays, config)
        sent = time.perf_counter()
        total = self.round_sum({p: self.federation.examples[p] for p in records})
        try:
            with one_torch_thread():  # the replies are added up while clients train
                exchange = self.federation.exchange(server_round, MessageType.TRAIN, records, consume=total.add,
                                                    check=total.check)
        except RoundFailedError as err:
            if not self._files_unreadable(err):
                raise
            return self.train_round(server_round, arrays, config)
        finally:
            discard(next(iter(records.values())))  # this round's global model file, if it went as one
        answered = time.perf_counter()
        delta, metrics = total.result()
        if self.privacy is not None:
            metrics["clipping_norm"] = self.privacy.clipping_norm  # this round's C, before an adaptive step
            self.privacy.add_noise_(delta, server_round)
            self.privacy.end_round_(int(metrics["clipped"]), int(metrics["clients"]), server_round)
        metrics["bytes_sent"], metrics["bytes_received"] = exchange.bytes_sent, exchange.bytes_received
        metrics["time_send"], metrics["time_exchange"] = sent - started, answered - sent  # seconds, by phase
        metrics["time_aggregate"] = time.perf_counter() - answered  # what was left to add after the last reply
        return delta, metrics

    def evaluate_round(self, server_round: int, state: dict[str, Tensor], clients: int) -> MetricRecord:
        """`clients` sampled clients evaluate the global model on their own shards: example-weighted means."""
        pids = sample_partitions(self.seed, server_round, self.num_clients, clients, Phase.EVALUATE)
        exchange = self.send_model(server_round, MessageType.EVALUATE, state, pids, check=check_evaluation)
        metrics = [m.content[Key.METRICS] for m in exchange.replies]
        total = sum(float(m[Key.NUM_EXAMPLES]) for m in metrics)
        return MetricRecord({k: sum(float(m[k]) * float(m[Key.NUM_EXAMPLES]) for m in metrics) / total
                             for k in ("loss", "accuracy")})

    def round_sum(self, examples: dict[int, int]) -> RoundSum:
        """The running sum of a round whose partitions hold these many training images."""
        return RoundSum(self, examples)

    @staticmethod
    def _scatter(values: Tensor, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        full = {n: torch.zeros(m.shape) for n, m in masks.items()}
        add_trainable_(full, values, masks)
        return full

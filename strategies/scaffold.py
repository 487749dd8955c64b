"""SCAFFOLD (Karimireddy et al. 2020), the server's side: the control variate c, sent to every sampled client
with the global model, and its update c <- c + (1/N) sum_{i in S} (c_i+ - c_i) over the sampled clients S of
N (which keeps c the mean of all N clients' c_i). The model update is SeededFedAvg's: the example-weighted mean
of y_i - x, through the server optimizer if one is set. The clients' side is fed_app/flower/scaffold.py."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from fed_app.task.seeds import Phase
from fed_app.flower.transport import carry, holds, take
from fed_app.flower.wire import Form, Key
from strategies.fedavg import PHASES, RoundSum, SeededFedAvg


class ControlSum(RoundSum):
    """RoundSum that also adds up the clients' control changes (in partition order) and, with the round's
    result, moves c by (1/N) times their sum."""

    def __init__(self, strategy: SeededScaffold, examples: dict[int, int]):
        super().__init__(strategy, examples)
        self.changes: Tensor | None = None

    def add(self, reply: Message) -> None:
        if holds(reply.content, Key.CONTROL_DELTA):  # train rounds; step 0's head rounds carry none
            change = take(reply.content, Key.CONTROL_DELTA, delete=True)[Form.FLAT]
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

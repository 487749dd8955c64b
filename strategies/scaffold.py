"""SCAFFOLD (Karimireddy et al. 2020), the server's side: the control variate c, sent to every sampled client
with the global model, and its update c <- c + (1/N) sum_{i in S} (c_i+ - c_i) over the sampled clients S of
N (which keeps c the mean of all N clients' c_i). The model update is SeededFedAvg's: the example-weighted mean
of y_i - x, through the server optimizer if one is set. The clients' side is fed_app/scaffold.py."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from fed_app.seeds import Phase
from fed_app.transport import carry, holds, take
from fed_app.wire import Form, Key
from strategies.fedavg import PHASES, SeededFedAvg


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

    def aggregate_train(self, server_round: int, replies: list[Message]):
        """c += (1/N) * the sum of the control changes, added in partition-id order; then FedAvg's mean."""
        contents = sorted((m.content for m in replies), key=lambda c: int(c[Key.METRICS][Key.PARTITION_ID]))
        if contents and holds(contents[0], Key.CONTROL_DELTA):
            total = torch.zeros_like(self.control)
            for content in contents:
                total += take(content, Key.CONTROL_DELTA, delete=True)[Form.FLAT]
            self.control += total / self.num_clients
        return super().aggregate_train(server_round, replies)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server_control": self.control.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.control = state["server_control"].clone()

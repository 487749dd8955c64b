"""Server optimizers: with the same client replies, each equals Flower's own strategy of the same name over
several rounds; fedavgm with momentum 0 and server-lr 1 is FedAvg bit for bit; state survives a checkpoint."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from fed_app.config import ConfigError, RunConfig
from fed_app.flower.federation import Federation
from fed_app.registry import SERVER_OPTIMIZERS
from strategies.fedavg import SeededFedAvg
from strategies.server_opt import make_server_optimizer

from ..conftest import PushPullGrid

STEPPING = sorted(n for n in SERVER_OPTIMIZERS if n != "fedavg")  # 'fedavg' adds the mean delta as it is

pytestmark = pytest.mark.usefixtures("server_app_identity")  # these tests build Flower messages

SETTINGS = {"server-lr": 0.05, "server-momentum": 0.7, "server-beta1": 0.8, "server-beta2": 0.95,
            "server-tau": 0.01}


def _flower(name: str):
    s = SETTINGS
    if name == "fedavgm":
        return flower.FedAvgM(server_learning_rate=s["server-lr"], server_momentum=s["server-momentum"])
    if name == "fedadagrad":
        return flower.FedAdagrad(eta=s["server-lr"], tau=s["server-tau"])
    return {"fedadam": flower.FedAdam, "fedyogi": flower.FedYogi}[name](
        eta=s["server-lr"], beta_1=s["server-beta1"], beta_2=s["server-beta2"], tau=s["server-tau"])


def _replies(x: np.ndarray, server_round: int) -> tuple[list[Message], np.ndarray]:
    """Four clients' trained weights (x + their delta) and example counts; also the weighted mean delta."""
    g = np.random.default_rng(server_round)
    deltas = [g.normal(0, 0.1 * (k + 1), size=x.shape).astype(np.float32) for k in range(4)]
    examples = [30, 10, 45, 15]
    replies = []
    for delta, n in zip(deltas, examples):
        sent = Message(RecordDict(), dst_node_id=1, message_type="train")
        content = RecordDict({"arrays": ArrayRecord([x + delta]), "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content, reply_to=sent))
    mean = sum(n * d for n, d in zip(examples, deltas)) / sum(examples)
    return replies, mean.astype(np.float32)


@pytest.mark.parametrize("name", STEPPING)
def test_each_server_optimizer_equals_flowers_strategy_of_the_same_name_over_rounds(name):
    theirs = _flower(name)
    ours = make_server_optimizer(RunConfig.from_run_config({**SETTINGS, "server-optimizer": name}))
    x = np.random.default_rng(0).normal(size=(257,)).astype(np.float32)
    mine = torch.from_numpy(x.copy())
    for server_round in range(1, 6):
        replies, mean = _replies(x, server_round)
        # what Flower's configure_train stores before aggregating
        theirs.current_arrays = ArrayRecord([x]) if name == "fedavgm" else {"0": x}
        arrays, _ = theirs.aggregate_train(server_round, replies)
        x = next(iter(arrays.to_numpy_ndarrays()))
        ours.step(mine, torch.from_numpy(mean), server_round)
        np.testing.assert_allclose(mine.numpy(), x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(x, np.random.default_rng(0).normal(size=(257,)).astype(np.float32))  # it moved


class Clients(PushPullGrid):
    """Answers train messages with a fixed dense delta per partition, as the ClientApp would."""

    def __init__(self, nodes):
        self.pid_of = {node: pid for pid, node in nodes.items()}

    def answer(self, messages):
        replies = []
        for msg in messages:
            pid = self.pid_of[msg.metadata.dst_node_id]
            delta = torch.randn(6, generator=torch.Generator().manual_seed(pid)) / 7
            metrics = MetricRecord({"train_loss": 1.0, "num-examples": pid + 3, "partition-id": pid})
            replies.append(Message(RecordDict({"delta": ArrayRecord({"flat": delta}), "metrics": metrics}),
                                   reply_to=msg))
        return replies


def _rounds(server_optimizer, rounds=4):
    nodes = {pid: 1000 + pid for pid in range(10)}
    strategy = SeededFedAvg(3, 10, 4, Federation(Clients(nodes), nodes, {p: p + 3 for p in nodes}, 0, 5), None, "fedavg", server_optimizer)
    state = {"w": torch.arange(4.0), "b": torch.ones(2)}
    for r in range(1, rounds + 1):
        state, _ = strategy.advance(r, state)
    return state


def test_fedavgm_with_momentum_0_and_server_lr_1_is_fedavg_bit_for_bit():
    plain = _rounds(None)
    cfg = RunConfig.from_run_config({"server-optimizer": "fedavgm", "server-lr": 1.0, "server-momentum": 0.0})
    momentum = _rounds(make_server_optimizer(cfg))
    assert all(torch.equal(plain[k], momentum[k]) for k in plain)
    moved = _rounds(make_server_optimizer(cfg.replace(server_momentum=0.9)))
    assert not torch.equal(plain["w"], moved["w"])


@pytest.mark.parametrize("name", STEPPING)
def test_server_optimizer_state_through_a_checkpoint_resumes_exactly(name):
    cfg = RunConfig.from_run_config({**SETTINGS, "server-optimizer": name})
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(50, generator=g) for _ in range(6)]
    whole, x = make_server_optimizer(cfg), torch.zeros(50)
    for r, d in enumerate(deltas, 1):
        whole.step(x, d, r)
    first, y = make_server_optimizer(cfg), torch.zeros(50)
    for r, d in enumerate(deltas[:3], 1):
        first.step(y, d, r)
    buffer = io.BytesIO()
    torch.save({"model": y, "server_optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, y = make_server_optimizer(cfg), saved["model"]
    resumed.load_state_dict(saved["server_optimizer"])
    for r, d in enumerate(deltas[3:], 4):
        resumed.step(y, d, r)
    assert torch.equal(x, y)


def test_a_server_optimizer_on_a_sparse_run_is_one_sentence():
    with pytest.raises(ConfigError, match=r"server-optimizer='fedadam' steps on the dense global model; with "
                                          r"optimizer='sparse-sgdm' use server-optimizer='fedavg'"):
        RunConfig(server_optimizer="fedadam", optimizer="sparse-sgdm", head="ridge")

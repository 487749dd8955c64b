"""Robust aggregation rules: on the same replies, each equals Flower's strategy of the same name (Flower's clients
send models, fedit's their deltas from the one global model); bad settings are one sentence before any work."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from fed_app import server_app
from fed_app.config import ConfigError, RunConfig
from strategies.mean import aggregation_rule

from ..conftest import InProcessGrid, fl_cfg

pytestmark = pytest.mark.usefixtures("server_app_identity")  # these tests build Flower messages

SHAPES = {"w": (5, 7), "b": (7,)}
EXAMPLES = [30, 10, 45, 15, 25, 20, 40]


def _flower(name: str):
    return {"median": lambda: flower.FedMedian(),
            "trimmed-mean": lambda: flower.FedTrimmedAvg(beta=0.2),
            "krum": lambda: flower.Krum(num_malicious_nodes=1),
            "multi-krum": lambda: flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
            "bulyan": lambda: flower.Bulyan(num_malicious_nodes=1)}[name]()


def _round(seed: int):
    """Seven clients' deltas (two of them attacks: a sign flip scaled 10x, a large Gaussian) from a global model."""
    g = np.random.default_rng(seed)
    start = {k: g.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    deltas = [{k: g.normal(0.1, 0.05, size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in EXAMPLES]
    deltas[2] = {k: -10 * v for k, v in deltas[2].items()}
    deltas[5] = {k: g.normal(0, 3.0, size=s).astype(np.float32) for k, s in SHAPES.items()}
    return start, deltas


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_each_robust_rule_equals_flowers_strategy_of_the_same_name_on_the_same_replies(name):
    cfg = RunConfig.from_run_config({"aggregation": name, "num-malicious-clients": 1, "multi-krum-selected": 3,
                                     "trim-beta": 0.2, "num-clients": 10, "fraction-train": 0.7})
    for seed in range(5):
        start, deltas = _round(seed)
        replies = []
        for delta, n in zip(deltas, EXAMPLES):
            sent = Message(RecordDict(), dst_node_id=1, message_type="train")
            model = ArrayRecord({k: Array(start[k] + delta[k]) for k in SHAPES})  # what Flower's clients send
            replies.append(Message(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": n})}),
                                   reply_to=sent))
        theirs, _ = _flower(name).aggregate_train(1, replies)
        rule = aggregation_rule(cfg)(sum(EXAMPLES))
        for delta, n in zip(deltas, EXAMPLES):
            rule.add({k: torch.from_numpy(v) for k, v in delta.items()}, n)
        ours = rule.result()
        for k in SHAPES:
            np.testing.assert_allclose(start[k] + ours[k].numpy(), theirs[k].numpy(), rtol=1e-5, atol=1e-5)
        attacked = np.abs(start["w"] + ours["w"].numpy() - start["w"]).max()
        assert attacked < 1.0  # the attacks moved nothing far: the honest deltas are about 0.1


def test_bad_robust_settings_are_one_sentence_before_any_work():
    cases = {
        (("aggregation", "bulyan"), ("num-malicious-clients", 1)):
            "aggregation='bulyan' with num-malicious-clients=1 needs at least 7 clients a round (4f + 3), and "
            "num-clients=100 with fraction-train=0.05 samples 5; raise fraction-train or lower num-malicious-clients.",
        (("aggregation", "multi-krum"), ("multi-krum-selected", 9)):
            "multi-krum-selected=9 is more than the 5 clients a round (num-clients=100, fraction-train=0.05); "
            "select at most 5.",
        (("aggregation", "median"), ("optimizer", "sparse-sgdm"), ("head", "ridge"), ("mask-scope", "local")):
            "aggregation='median' needs every client's update at full size, and mask-scope='local' sends each "
            "client its own entries; use mask-scope='global' or aggregation='fedavg'.",
        (("aggregation", "krum"), ("num-malicious-clients", 2)):
            "aggregation='krum' with num-malicious-clients=2 needs at least 7 clients a round (2f + 3), and "
            "num-clients=100 with fraction-train=0.05 samples 5; raise fraction-train or lower num-malicious-clients.",
        (("aggregation", "multi-krum"), ("num-malicious-clients", 2)):
            "aggregation='multi-krum' with num-malicious-clients=2 needs at least 7 clients a round (2f + 3), and "
            "num-clients=100 with fraction-train=0.05 samples 5; raise fraction-train or lower num-malicious-clients.",
        (("aggregation", "trimmed-mean"), ("num-malicious-clients", 2)):
            "aggregation='trimmed-mean' with trim-beta=0.2 cuts 1 of the 5 clients a round from each end, fewer "
            "than num-malicious-clients=2 (and at least one); raise trim-beta to at least 0.4.",
        (("aggregation", "trimmed-mean"), ("num-clients", 15), ("fraction-train", 0.2)):  # n=3: 0.2 cuts nobody
            "aggregation='trimmed-mean' with trim-beta=0.2 cuts 0 of the 3 clients a round from each end, fewer "
            "than num-malicious-clients=0 (and at least one); raise trim-beta to at least 0.333.",
    }
    for pairs, sentence in cases.items():
        with pytest.raises(ConfigError) as err:
            RunConfig.from_run_config({"fraction-train": 0.05, **dict(pairs)})
        assert str(err.value) == "run-config " + sentence
    with pytest.raises(ConfigError, match=r"trim-beta=0.5 is out of range; it must be < 0.5"):
        RunConfig.from_run_config({"trim-beta": 0.5})


def test_a_run_with_a_robust_rule_goes_through_the_real_server_and_clients_and_uses_the_rule(tmp_path):
    models = {}
    for name in ("median", "fedavg"):
        cfg = fl_cfg(tmp_path, name, aggregation=name, **{"fraction-train": 0.5})
        rows = server_app.run(InProcessGrid(cfg), cfg).rows()
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and all(r["clients"] == 5 for r in rows[1:])
        models[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(models["median"][k], models["fedavg"][k]) for k in models["fedavg"])


def test_pairwise_distances_in_chunks_equal_the_float64_ones_within_a_memory_bound(monkeypatch):
    from strategies import robust

    updates = torch.randn(6, 1001)
    exact = torch.cdist(updates.double(), updates.double()).square()
    monkeypatch.setattr(robust, "CHUNK_BYTES", 8 * 6 * 100)  # 100 columns at a time: 11 chunks, the last short
    chunks = []
    real = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b: chunks.append(a.shape) or real(a, b))
    torch.testing.assert_close(robust.squared_distances(updates), exact, rtol=1e-10, atol=1e-9)
    assert len(chunks) == 11 and max(shape[1] for shape in chunks) == 100  # never a 6 x 1001 float64 copy

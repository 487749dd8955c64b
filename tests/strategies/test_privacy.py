"""Client-level DP: clipping and the clipped mean equal Flower's wrapper and client mod on the same replies; the
noise is sigma C / n, drawn from (seed, round); each row's epsilon is the accountant's for the rounds so far; a
killed DP run resumes bit for bit; a sparse DP run never moves a frozen entry; every client of a round weighs the
same; what DP cannot account for is one sentence."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from fed_app import server_app
from fed_app.config import ConfigError, RunConfig
from fed_app.flower.federation import Federation
from fed_app.flower.loaded_task import load_task
from fed_app.task.head import head_name
from strategies.fedavg import SeededFedAvg, sample_partitions, weighted_average
from strategies.privacy import DpFedAvg, clipped
from fed_app.runs.rundir import RunDir

from ..conftest import InProcessGrid, PushPullGrid, fl_cfg, run_in_process

pytestmark = pytest.mark.usefixtures("server_app_identity")  # these tests build Flower messages

SHAPES = {"w": (6, 5), "b": (5,)}


class EchoGrid(PushPullGrid):
    """Clients whose update is their partition id in every entry, trained on `examples[pid]` images."""

    def __init__(self, nodes, examples):
        self.pid_of, self.examples = {node: pid for pid, node in nodes.items()}, examples

    def answer(self, messages):
        replies = []
        for msg in messages:
            pid = self.pid_of[msg.metadata.dst_node_id]
            metrics = MetricRecord({"train_loss": 0.0, "num-examples": self.examples[pid], "partition-id": pid})
            delta = ArrayRecord({"w": torch.full((2,), float(pid))})
            replies.append(Message(RecordDict({"delta": delta, "metrics": metrics}), reply_to=msg))
        return replies


def _updates(seed: int, n: int = 5):
    g = np.random.default_rng(seed)
    start = {k: g.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    deltas = [{k: g.normal(0, 0.3 * (i + 1), size=s).astype(np.float32) for k, s in SHAPES.items()}
              for i in range(n)]  # norms about 1.6 to 8: some under C = 3, some over
    return start, deltas


def test_server_side_clipping_and_the_mean_equal_flowers_wrapper_on_the_same_replies():
    examples = [40, 10, 30, 20, 25]
    for seed in range(4):
        start, deltas = _updates(seed)
        wrapper = flower.DifferentialPrivacyServerSideFixedClipping(flower.FedAvg(), noise_multiplier=0.0,
                                                                    clipping_norm=3.0, num_sampled_clients=5)
        wrapper.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})  # what configure_train keeps
        replies = []
        for delta, n in zip(deltas, examples):
            sent = Message(RecordDict(), dst_node_id=1, message_type="train")
            model = ArrayRecord({k: Array(start[k] + delta[k]) for k in SHAPES})
            replies.append(Message(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": n})}),
                                   reply_to=sent))
        theirs, _ = wrapper.aggregate_train(1, replies)
        ours = weighted_average([clipped({k: torch.from_numpy(v) for k, v in d.items()}, 3.0)[0] for d in deltas],
                                examples)
        for k in SHAPES:
            np.testing.assert_allclose(start[k] + ours[k].numpy(), theirs[k].numpy(), rtol=1e-5, atol=1e-6)


def test_a_clients_own_clipping_equals_flowers_client_mod():
    start, deltas = _updates(7)
    for delta in deltas:
        model = [start[k] + delta[k] for k in SHAPES]
        compute_clip_model_update(model, [start[k] for k in SHAPES], 3.0)  # what fixedclipping_mod sends
        ours, was = clipped({k: torch.from_numpy(v) for k, v in delta.items()}, 3.0)
        norm = np.sqrt(sum(np.square(v).sum() for v in delta.values()))
        assert was == (norm > 3.0)
        for (k, theirs) in zip(SHAPES, model):
            np.testing.assert_allclose(start[k] + ours[k].numpy(), theirs, rtol=1e-5, atol=1e-6)


def test_the_noise_is_sigma_c_over_n_per_entry_and_drawn_from_seed_and_round(tmp_path):
    cfg = fl_cfg(tmp_path, "x", dp="server-fixed", **{"dp-noise-multiplier": 0.8, "dp-clipping-norm": 2.0})
    privacy = DpFedAvg(cfg)
    assert privacy.noise_std == pytest.approx(compute_stdv(0.8, 2.0, 3))  # Flower's formula, 3 clients a round
    draws = []
    for server_round in (4, 4, 5):
        mean = {"a": torch.zeros(300, 200), "b": torch.zeros(40_000)}
        privacy.add_noise_(mean, server_round)
        draws.append(torch.cat([mean["a"].flatten(), mean["b"]]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].std().item() == pytest.approx(privacy.noise_std, rel=0.01) and abs(draws[0].mean()) < 0.01
    flat = {"all": torch.zeros(100_000)}  # the same update as one flat buffer gets the same noise
    privacy.add_noise_(flat, 4)
    assert torch.equal(flat["all"], draws[0])


@pytest.mark.parametrize("dp", ["server-fixed", "client-adaptive"])
def test_each_row_states_the_epsilon_its_rounds_spend_and_a_killed_run_resumes_bit_for_bit(tmp_path, dp):
    settings = {"dp": dp, "dp-noise-multiplier": 1.1, "dp-clipping-norm": 0.5, "num-rounds": 6,
                "checkpoint-every": 2, "eval-every": 2, "dp-clipped-count-stddev": 1.0}
    whole = run_in_process(fl_cfg(tmp_path, "whole", **settings))
    cut = fl_cfg(tmp_path, "cut", **settings)
    with pytest.raises(RuntimeError, match="the federation went away"):
        server_app.run(InProcessGrid(cut, fail_after=3 * 3 + 1), cut)
    run_in_process(cut)

    def rows(folder):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time")}
                for line in (folder / "rows.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "cut") == rows(whole)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    spent = [r["epsilon"] for r in rows(whole)[1:]]
    assert all(x < y for x, y in zip(spent, spent[1:]))  # every round spends more
    privacy = DpFedAvg(cut)
    assert spent == [privacy.epsilon(r) for r in range(1, 7)]
    everyone = DpFedAvg(cut.replace(fraction_train=1.0))
    assert privacy.epsilon(6) < everyone.epsilon(6)  # sampling 3 of 10 amplifies the privacy of a round
    assert all(0 <= r["clipped"] <= r["clients"] for r in rows(whole)[1:]) and sum(r["clipped"] for r in rows(whole)[1:]) > 0
    norms = [r["clipping_norm"] for r in rows(whole)[1:]]  # each round's C: adaptive moves it, resumed alike
    assert (len(set(norms)) == 6) == (dp == "client-adaptive") and norms[0] == 0.5


def test_dp_noise_reaches_only_what_the_clients_train_sparse_or_dense(tmp_path):
    settings = {"dp": "client-fixed", "head": "logistic", "dp-noise-multiplier": 0.3, "dp-clipping-norm": 0.05,
                "num-rounds": 2}
    sparse = fl_cfg(tmp_path, "sparse", optimizer="sparse-sgdm", sparsity=0.8,
                    **{"calibration-rounds": 1, "fisher-samples": 32}, **settings)
    dense = fl_cfg(tmp_path, "dense", lr=0.005, **settings)  # the step-0 head frozen, as in the sparse control
    for cfg in (sparse, dense):
        run_in_process(cfg)
        assert (tmp_path / cfg.run_dir / "DONE").exists()  # it learned through the noise, not diverged
    initial = load_task(sparse).initial_state()
    masks = RunDir(tmp_path / "sparse").load_mask()
    final = torch.load(tmp_path / "sparse" / "checkpoint.pt", weights_only=True)["model"]
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], initial[name][~mask])  # the noise never reached a frozen entry
        assert not mask.any() or not torch.equal(final[name][mask], initial[name][mask])
    dense_final = torch.load(tmp_path / "dense" / "checkpoint.pt", weights_only=True)["model"]
    head = head_name(load_task(dense).model)
    assert any(not torch.equal(t, initial[n]) for n, t in dense_final.items() if not n.startswith(head))  # trained
    # the frozen head is step 0's in both runs (the same logistic fit): the noise on the dense update left it alone
    assert all(torch.equal(t, final[n]) for n, t in dense_final.items() if n.startswith(head))


def test_adaptive_clipping_grows_c_when_most_updates_are_clipped_where_flowers_wrapper_shrinks_it():
    start, deltas = _updates(3)  # norms about 1.6 to 8, all above C = 1
    wrapper = flower.DifferentialPrivacyServerSideAdaptiveClipping(flower.FedAvg(), noise_multiplier=0.0,
                                                                   num_sampled_clients=5, initial_clipping_norm=1.0)
    wrapper.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    replies = []
    for delta in deltas:
        sent = Message(RecordDict(), dst_node_id=1, message_type="train")
        model = ArrayRecord({k: Array(start[k] + delta[k]) for k in SHAPES})
        replies.append(Message(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": 10})}),
                               reply_to=sent))
    theirs, _ = wrapper.aggregate_train(1, replies)
    cfg = RunConfig.from_run_config({"num-clients": 5, "fraction-train": 1.0, "dp": "server-adaptive",
                                     "dp-clipping-norm": 1.0, "dp-noise-multiplier": 1e-12,
                                     "dp-clipped-count-stddev": 1e-11})  # the noise negligible, as Flower's 0
    ours = DpFedAvg(cfg)
    clipped_updates = [clipped({k: torch.from_numpy(v) for k, v in d.items()}, ours.clipping_norm) for d in deltas]
    mean = weighted_average([u for u, _ in clipped_updates], [10] * 5)
    for k in SHAPES:  # the same clipping and mean, at the round's C
        np.testing.assert_allclose(start[k] + mean[k].numpy(), theirs[k].numpy(), rtol=1e-5, atol=1e-6)
    ours.end_round_(sum(was for _, was in clipped_updates), 5, 1)
    assert ours.clipping_norm == pytest.approx(np.exp(0.2 * 0.5))  # none unclipped, target 0.5: C grows
    assert wrapper.clipping_norm == pytest.approx(np.exp(-0.2 * 0.5))  # Flower's: the clipped share in its place
    for _ in range(30):  # and settles where half the updates are clipped
        ours.end_round_(sum(clipped(u, ours.clipping_norm)[1] for u in [{k: torch.from_numpy(v) for k, v in d.items()}
                                                                      for d in deltas]), 5, 2)
    norms = sorted(np.sqrt(sum(np.square(v).sum() for v in d.values())) for d in deltas)
    assert norms[1] <= ours.clipping_norm <= norms[3]


def test_what_dp_cannot_account_for_is_one_sentence_before_any_work():
    cases = {
        (("aggregation", "median"),): "dp='server-fixed' does not fit aggregation='median': its noise is calibrated "
                                      "to a mean of clipped updates; use aggregation='fedavg'.",
        (("client-algorithm", "scaffold"),): "dp='server-fixed' does not fit client-algorithm='scaffold': SCAFFOLD's "
                                             "control variates would travel unclipped and un-noised; use "
                                             "client-algorithm='fedavg'.",
        (("head", "train"),): "dp='server-fixed' does not fit head='train': the head rounds of step 0 would be "
                              "releases it does not account for; use head='logistic' (step 0's statistics are "
                              "outside the accountant) or head='none'.",
    }
    for pairs, sentence in cases.items():
        with pytest.raises(ConfigError) as err:
            RunConfig.from_run_config({"dp": "server-fixed", **dict(pairs)})
        assert str(err.value) == "run-config " + sentence
    with pytest.raises(ConfigError) as err:  # 10 clients a round: Flower's count noise 0.5 leaves sigma < 1
        RunConfig.from_run_config({"dp": "client-adaptive", "num-clients": 100, "fraction-train": 0.1})
    assert str(err.value) == ("run-config dp='client-adaptive' splits dp-noise-multiplier=1.0 between the update and "
                              "the count of unclipped updates, and a count noise of 0.5 leaves none for the update; "
                              "set dp-clipped-count-stddev above 0.5 (e.g. 1) or lower dp-noise-multiplier.")
    with pytest.raises(ConfigError, match=r"dp-noise-multiplier=0.0 is out of range; it must be > 0.0"):
        RunConfig.from_run_config({"dp": "server-fixed", "dp-noise-multiplier": 0.0})


def test_under_dp_every_client_of_a_round_weighs_the_same_whatever_its_shard():
    nodes, examples = {pid: 1000 + pid for pid in range(10)}, {pid: 10 * (pid + 1) for pid in range(10)}
    strategy = SeededFedAvg(seed=3, num_clients=10, per_round=4,
                            federation=Federation(EchoGrid(nodes, examples), nodes, examples, 0, 5))
    cfg = RunConfig.from_run_config({"num-clients": 10, "fraction-train": 0.4, "seed": 3, "dp": "server-fixed",
                                     "dp-clipping-norm": 100.0, "dp-noise-multiplier": 1e-9})  # no clip, no noise
    strategy.privacy = DpFedAvg(cfg)
    delta, _ = strategy.train_round(1, {"w": torch.zeros(2)}, ConfigRecord())
    sampled = sample_partitions(3, 1, 10, 4)
    assert torch.allclose(delta["w"], torch.full((2,), sum(sampled) / 4), atol=1e-6)  # not weighted by 10 (p + 1)

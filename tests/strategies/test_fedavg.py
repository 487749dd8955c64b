"""SeededFedAvg's round: failed clients are retried, never silently dropped; aggregation is weighted."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.fedavg import RoundFailedError, SeededFedAvg, sample_partitions


class FlakyGrid:
    """Answers train messages like clients would; the partitions in `fail` error out `times` times."""

    def __init__(self, nodes, fail, times):
        self.pid_of = {node: pid for pid, node in nodes.items()}
        self.fail, self.times, self.sent = set(fail), times, []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            pid = self.pid_of[msg.metadata.dst_node_id]
            self.sent.append(pid)
            if pid in self.fail and self.sent.count(pid) <= self.times:
                replies.append(Message(Error(code=0, reason="worker killed (out of memory)"), reply_to=msg))
                continue
            delta = ArrayRecord({"w": torch.full((2,), float(pid))})
            metrics = MetricRecord({"train_loss": float(pid), "num-examples": pid + 1, "partition-id": pid})
            replies.append(Message(RecordDict({"delta": delta, "metrics": metrics}), reply_to=msg))
        return replies


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _strategy(max_retries):
    nodes = {pid: 1000 + pid for pid in range(10)}
    return SeededFedAvg(seed=3, num_clients=10, per_round=4, nodes=nodes, max_retries=max_retries, timeout=5), nodes


def test_a_failed_client_is_retried_and_the_round_averages_every_sampled_client():
    strategy, nodes = _strategy(max_retries=2)
    sampled = sample_partitions(3, 1, 10, 4)
    grid = FlakyGrid(nodes, fail=[sampled[0]], times=1)
    delta, metrics = strategy.train_round(grid, 1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord())
    assert grid.sent == sampled + [sampled[0]]  # resent to the failed client only
    weights = [p + 1 for p in sampled]
    expected = sum(w * p for w, p in zip(weights, sampled)) / sum(weights)
    assert torch.allclose(delta.to_torch_state_dict()["w"], torch.full((2,), expected))
    assert metrics["clients"] == 4


def test_a_client_failing_past_the_retries_fails_the_round_with_a_clear_message():
    strategy, nodes = _strategy(max_retries=1)
    sampled = sample_partitions(3, 1, 10, 4)
    grid = FlakyGrid(nodes, fail=[sampled[2]], times=5)
    with pytest.raises(RoundFailedError, match=rf"round 1: clients \[{sampled[2]}\] failed after 1 retries "
                                               r"\(worker killed \(out of memory\)\); rerun the same command"):
        strategy.train_round(grid, 1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord())


def test_fail_policy_means_no_retry():
    strategy, nodes = _strategy(max_retries=0)
    grid = FlakyGrid(nodes, fail=sample_partitions(3, 1, 10, 4)[:1], times=1)
    with pytest.raises(RoundFailedError):
        strategy.train_round(grid, 1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord())
    assert len(grid.sent) == 4

"""SeededFedAvg: sampling is a function of (seed, round); failed clients are retried, never silently dropped;
aggregation is example-weighted (masked: over the clients that train an entry); files and messages agree."""

import contextlib

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fed_app.flower import payload_files
from fed_app.flower.payload import SharedFiles, carry, folder_of, take
from fed_app.flower.replies import reply_tag
from fed_app.flower.federation import Federation
from strategies.fedavg import RoundFailedError, SeededFedAvg, masked_average, sample_partitions, weighted_average

from ..conftest import PushPullGrid
from ..fed_app.flower.test_payload_files import files_cannot_grow_past

NODES = {pid: 1000 + pid for pid in range(10)}
EXAMPLES = {pid: pid + 1 for pid in range(10)}  # what the clients below report training on


class FlakyGrid(PushPullGrid):
    """Answers train messages like clients would; the partitions in `fail` error out `times` times."""

    def __init__(self, nodes, fail, times):
        self.pid_of = {node: pid for pid, node in nodes.items()}
        self.fail, self.times, self.sent = set(fail), times, []

    def answer(self, messages):
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


pytestmark = pytest.mark.usefixtures("server_app_identity")  # these tests build Flower messages


def _strategy(grid, max_retries, files=None):
    return SeededFedAvg(seed=3, num_clients=10, per_round=4, federation=Federation(grid, NODES, EXAMPLES, max_retries, 5),
                        files=files)


def test_a_failed_client_is_retried_and_the_round_averages_every_sampled_client():
    sampled = sample_partitions(3, 1, 10, 4)
    grid = FlakyGrid(NODES, fail=[sampled[0]], times=1)
    delta, metrics = _strategy(grid, max_retries=2).train_round(1, {"w": torch.zeros(2)}, ConfigRecord())
    assert grid.sent == sampled + [sampled[0]]  # resent to the failed client only
    weights = [p + 1 for p in sampled]
    expected = sum(w * p for w, p in zip(weights, sampled)) / sum(weights)
    assert torch.allclose(delta["w"], torch.full((2,), expected))
    assert metrics["clients"] == 4


def test_replies_are_added_up_on_one_torch_thread_and_the_threads_come_back_after():
    class Counting(FlakyGrid):
        def answer(self, messages):
            self.threads = torch.get_num_threads()  # while replies come in and are added up
            return super().answer(messages)

    torch.set_num_threads(2)
    grid = Counting(NODES, fail=[], times=0)
    _strategy(grid, max_retries=0).train_round(1, {"w": torch.zeros(2)}, ConfigRecord())
    assert grid.threads == 1 and torch.get_num_threads() == 2


def test_a_client_failing_past_the_retries_fails_the_round_with_a_clear_message():
    sampled = sample_partitions(3, 1, 10, 4)
    grid = FlakyGrid(NODES, fail=[sampled[2]], times=5)
    strategy = _strategy(grid, max_retries=1)
    with pytest.raises(RoundFailedError, match=rf"round 1: clients \[{sampled[2]}\] failed after 1 retries "
                                               r"\(worker killed \(out of memory\)\); rerun the same command"):
        strategy.train_round(1, {"w": torch.zeros(2)}, ConfigRecord())


def test_fail_policy_means_no_retry():
    grid = FlakyGrid(NODES, fail=sample_partitions(3, 1, 10, 4)[:1], times=1)
    with pytest.raises(RoundFailedError):
        _strategy(grid, max_retries=0).train_round(1, {"w": torch.zeros(2)}, ConfigRecord())
    assert len(grid.sent) == 4


class FileClients(PushPullGrid):
    """Clients that answer the way the ClientApp does: in the form they were asked in."""

    def __init__(self, nodes):
        self.pid_of = {node: pid for pid, node in nodes.items()}
        self.contents = []

    def answer(self, messages):
        replies = []
        for msg in messages:
            pid = self.pid_of[msg.metadata.dst_node_id]
            self.contents.append(msg.content)
            delta = {"w": take(msg.content, "arrays")["w"] + pid}
            metrics = MetricRecord({"train_loss": float(pid), "num-examples": pid + 1, "partition-id": pid})
            replies.append(Message(RecordDict({**carry("delta", delta, folder_of(msg.content), reply_tag(msg.content)), "metrics": metrics}),
                                   reply_to=msg))
        return replies


def test_files_transport_gives_the_message_result_with_tiny_messages_and_leaves_no_file(tmp_path):
    files = SharedFiles("test-transport", 10**6)
    results = {}
    for name, via in (("messages", None), ("files", files)):
        grid = FileClients(NODES)
        delta, metrics = _strategy(grid, max_retries=0, files=via).train_round(1, {"w": torch.arange(3.0)},
                                                                             ConfigRecord())
        results[name] = (delta["w"], metrics["bytes_sent"], metrics["bytes_received"], grid)
    sampled = sample_partitions(3, 1, 10, 4)
    expected = torch.arange(3.0) + sum((p + 1) * p for p in sampled) / sum(p + 1 for p in sampled)
    assert torch.equal(results["files"][0], results["messages"][0]) and torch.allclose(results["files"][0], expected)
    assert results["files"][1:3] == results["messages"][1:3]  # payload bytes count the same either way
    assert results["files"][1] >= 4 * 12
    sent = results["files"][3].contents
    assert all("arrays" not in c and str(c["arrays-file"]["path"]).startswith(str(files.root)) for c in sent)
    assert len({str(c["arrays-file"]["path"]) for c in sent}) == 1  # the global model is written once a round
    assert list(files.root.iterdir()) == []  # the round's model and the clients' updates are gone
    files.close()
    assert not files.root.exists()


class RemoteClients(FileClients):
    """Clients on another machine: a model sent as a file cannot be read there."""

    def answer(self, messages):
        if any("arrays-file" in m.content for m in messages):
            self.contents += [m.content for m in messages]
            return [Message(Error(code=0, reason=f"<class 'fed_app.flower.payload.TransportError'>:<'no {m.content}'>"),
                            reply_to=m) for m in messages]
        return super().answer(messages)


def test_when_clients_cannot_read_the_files_the_round_is_redone_inside_messages(caplog):
    files = SharedFiles("test-remote", 10**6)
    grid = RemoteClients(NODES)
    strategy = _strategy(grid, max_retries=1, files=files)
    delta, metrics = strategy.train_round(1, {"w": torch.arange(3.0)}, ConfigRecord())
    sampled = sample_partitions(3, 1, 10, 4)
    expected = torch.arange(3.0) + sum((p + 1) * p for p in sampled) / sum(p + 1 for p in sampled)
    assert torch.allclose(delta["w"], expected) and metrics["clients"] == 4
    assert strategy.files is None and "arrays" in grid.contents[-1]  # later rounds send models in messages
    assert "sending models inside the messages from now on" in caplog.text
    assert list(files.root.iterdir()) == []
    files.close()


class QueryClients(PushPullGrid):
    """Answer a query about the model with its sum plus their partition id; `remote`: they cannot read files."""

    def __init__(self, nodes, remote=False):
        self.pid_of = {node: pid for pid, node in nodes.items()}
        self.remote, self.contents = remote, []

    def answer(self, messages):
        self.contents += [m.content for m in messages]
        if self.remote and any("arrays-file" in m.content for m in messages):
            return [Message(Error(code=0, reason="<class 'fed_app.flower.payload.TransportError'>:<'no file'>"),
                            reply_to=m) for m in messages]
        return [Message(RecordDict({"metrics": MetricRecord({
            "value": sum(float(t.sum()) for t in take(m.content, "arrays").values())  # flat or by name alike
            + self.pid_of[m.metadata.dst_node_id]})}),
            reply_to=m) for m in messages]


def test_a_model_sent_to_many_clients_goes_as_one_file_for_all_and_falls_back_to_messages(caplog):
    state = {"w": torch.arange(3.0), "b": torch.tensor([10.0])}  # sums to 13
    pids = [0, 4, 7]
    values = {}
    for name, remote in (("messages", False), ("files", False), ("remote", True)):
        files = None if name == "messages" else SharedFiles(f"test-query-{name}", 10**6)
        grid = QueryClients(NODES, remote)
        strategy = _strategy(grid, max_retries=1, files=files)
        values[name] = [r.content["metrics"]["value"] for r in strategy.send_model(0, "query.ridge", state, pids).replies]
        if name == "files":
            assert all("arrays" not in c for c in grid.contents)  # only the path travels
            assert len({str(c["arrays-file"]["path"]) for c in grid.contents}) == 1  # written once for all
        else:  # inside the messages the model goes by tensor, as Flower's examples send a state dict
            assert list(grid.contents[-1]["arrays"]) == ["w", "b"]
        if name == "remote":
            assert strategy.files is None and "arrays" in grid.contents[-1]
            assert "sending models inside the messages from now on" in caplog.text
        if files:
            assert list(files.root.iterdir()) == []  # the model file is gone after the query
            files.close()
    assert values["messages"] == values["files"] == values["remote"] == [13.0, 17.0, 20.0]


def test_local_masks_average_each_entry_over_the_clients_that_train_it():
    deltas = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([5.0, 6.0, 7.0])}]
    masks = [{"w": torch.tensor([True, True, False])}, {"w": torch.tensor([True, False, False])}]
    out = masked_average(deltas, masks, [1.0, 3.0])
    # entry 0: both train it, (1*1 + 3*5)/4; entry 1: only client 0, its own update; entry 2: nobody, 0
    assert out["w"].tolist() == [4.0, 2.0, 0.0]


def test_sampling_is_a_function_of_seed_and_round():
    a = sample_partitions(seed=1, server_round=5, num_clients=100, per_round=10)
    assert a == sample_partitions(1, 5, 100, 10) and len(set(a)) == 10 and all(0 <= p < 100 for p in a)
    assert a != sample_partitions(1, 6, 100, 10) and a != sample_partitions(2, 5, 100, 10)


def test_weighted_average_of_deltas_matches_a_hand_computation():
    deltas = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
              {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([6.0])}]
    avg = weighted_average(deltas, [1, 3])  # (1*d1 + 3*d2) / 4
    assert torch.allclose(avg["w"], torch.tensor([2.5, -1.0])) and torch.allclose(avg["b"], torch.tensor([4.5]))


class FullClients(FileClients):
    """Clients whose /dev/shm is full for partition `full` alone: an update it would write as a file fails as the
    ClientApp's does (Flower names the exception's class in the error's reason); the others, and it inside
    messages, answer as usual."""

    def __init__(self, nodes, full):
        super().__init__(nodes)
        self.full = full

    def answer(self, messages):
        replies = []
        for m in messages:
            if self.pid_of[m.metadata.dst_node_id] != self.full or "arrays-file" not in m.content:
                replies += super().answer([m])
                continue
            self.contents.append(m.content)
            try:
                with files_cannot_grow_past(100_000):
                    carry("delta", {"w": torch.zeros(1_000_000)}, folder_of(m.content))  # 4 MB
            except Exception as ex:
                replies.append(Message(Error(code=0, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=m))
        return replies


@pytest.mark.parametrize("full", ["server", "clients"])
def test_when_dev_shm_is_full_the_round_goes_inside_messages_and_leaves_no_file(tmp_path, monkeypatch, caplog, full):
    monkeypatch.setattr(payload_files, "SHM", tmp_path)  # a /dev/shm of the test's own
    files = SharedFiles("test-full", 10**6)
    sampled = sample_partitions(3, 1, 10, 4)
    grid = FullClients(NODES, full=sampled[0]) if full == "clients" else FileClients(NODES)
    strategy = _strategy(grid, max_retries=1, files=files)
    model = {"w": torch.arange(3.0)} if full == "clients" else {"w": torch.zeros(1_000_000)}
    with files_cannot_grow_past(100_000) if full == "server" else contextlib.nullcontext():
        delta, metrics = strategy.train_round(1, model, ConfigRecord())
    expected = model["w"] + sum((p + 1) * p for p in sampled) / sum(p + 1 for p in sampled)
    assert torch.allclose(delta["w"], expected) and metrics["clients"] == 4
    assert strategy.files is None and "arrays" in grid.contents[-1]  # later rounds send models in messages
    assert "no room for the payload file" in caplog.text and "sending models inside the messages" in caplog.text
    assert list(files.root.iterdir()) == []  # no partial file; no model, nor the others' updates, left taking room
    files.close()

"""Federation.exchange: replies polled and handed on in partition order as soon as they can be; a client that
errs or stays silent is resent to alone; the round fails in one sentence when one runs out of retries."""

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fed_app.flower.federation import Federation, RoundFailedError

from ...conftest import PushPullGrid

pytestmark = pytest.mark.usefixtures("server_app_identity")  # the test builds Flower messages

NODES = {pid: 100 + pid for pid in range(6)}


class Trickle(PushPullGrid):
    """Answers one message per pull, latest pushed first (or first pushed first); partitions in `silent`
    never answer their first message, those in `errs` answer it with an error."""

    def __init__(self, silent=(), errs=(), latest_first=True):
        self.silent, self.errs, self.seen, self.pushed = set(silent), set(errs), set(), []
        self.latest_first = latest_first

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed += [m.metadata.dst_node_id - 100 for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        queued = [m for m in self.__dict__.get("_queued", []) if m.metadata.message_id in set(message_ids)]
        for msg in reversed(queued) if self.latest_first else queued:
            pid = msg.metadata.dst_node_id - 100
            first = pid not in self.seen
            self.seen.add(pid)
            self._queued.remove(msg)
            if first and pid in self.silent:
                continue
            if first and pid in self.errs:
                return [Message(Error(code=0, reason="worker died"), reply_to=msg)]
            return [Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)]
        return []


def _exchange(grid, retries=1, timeout=5.0):
    handed = []
    federation = Federation(grid, NODES, dict.fromkeys(NODES, 1), retries, timeout)
    exchange = federation.exchange(1, "train", {p: RecordDict() for p in NODES},
                                   consume=lambda m: handed.append((int(m.content["metrics"]["partition-id"]),
                                                                    len(grid.__dict__.get("_queued", [])))))
    return exchange, handed


def test_replies_are_handed_on_in_partition_order_as_soon_as_every_earlier_one_has_come():
    exchange, handed = _exchange(Trickle())
    assert [pid for pid, _ in handed] == list(range(6))  # replies came 5, 4, ..., 0
    assert [int(m.content["metrics"]["partition-id"]) for m in exchange.replies] == list(range(6))
    _, handed = _exchange(Trickle(latest_first=False))
    assert handed[0] == (0, 5)  # partition 0 was handed on while five messages still waited for replies


def test_a_silent_or_failed_client_alone_is_sent_again():
    grid = Trickle(silent=[2], errs=[4])
    exchange, handed = _exchange(grid, retries=1, timeout=0.2)
    assert sorted(grid.pushed) == sorted(list(range(6)) + [2, 4]) and grid.pushed[6:] in ([2, 4], [4, 2])
    assert [pid for pid, _ in handed] == list(range(6)) and len(exchange.replies) == 6


def test_a_client_out_of_retries_fails_the_round_naming_it():
    with pytest.raises(RoundFailedError, match=r"^round 1: clients \[2\] failed after 0 retries \(no reply within "
                                               r"round-timeout=0.2s\); rerun the same command to resume"):
        _exchange(Trickle(silent=[2]), retries=0, timeout=0.2)



class Late(PushPullGrid):
    """Answers one waiting message at each pull numbered in `at` (1-based), none at the others."""

    def __init__(self, at):
        self.at, self.pulls = set(at), 0

    def pull_messages(self, message_ids):
        self.pulls += 1
        queued = [m for m in self.__dict__.get("_queued", []) if m.metadata.message_id in set(message_ids)]
        if self.pulls not in self.at or not queued:
            return []
        self._queued.remove(queued[0])
        pid = queued[0].metadata.dst_node_id - 100
        return [Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=queued[0])]


def test_the_poll_backs_off_while_no_reply_comes_and_is_prompt_again_after_one(monkeypatch):
    from fed_app.flower import federation

    slept = []
    monkeypatch.setattr(federation.time, "sleep", slept.append)
    Federation(Late(at=[8]), {0: 100}, {0: 1}, 0, 5.0).exchange(1, "train", {0: RecordDict()})
    assert slept == [0.01, 0.02, 0.04, 0.05, 0.05, 0.05, 0.05]  # doubling from 10 ms, at most 50 ms
    slept.clear()
    Federation(Late(at=[4, 7]), {0: 100, 1: 101}, {0: 1, 1: 1}, 0, 5.0).exchange(
        1, "train", {0: RecordDict(), 1: RecordDict()})
    assert slept == [0.01, 0.02, 0.04, 0.01, 0.02]  # back to 10 ms once a reply came

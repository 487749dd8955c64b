"""A client's reply is checked before it counts: a file it names outside what the server issued (the run's own
checkpoint, a FIFO), tensors of the wrong names or shapes, NaN or Inf fail that client for the round; nothing of
it is read, deleted, averaged or written, and a client that answers honestly when resent leaves the run exactly
as if it had never misbehaved."""

import json
import os
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fed_app import server_app
from fed_app.flower.federation import RoundFailedError
from fed_app.flower.payload import Form, Key, encode
from fed_app.flower.replies import reply_tag
from fed_app.runs.rundir import RunDir

from ...conftest import InProcessGrid, fl_cfg, play_server_app, run_in_process

pytestmark = pytest.mark.usefixtures("server_app_identity")


def _victim(msg: Message, run_dir: Path) -> dict:
    """A reply naming the run's checkpoint as its update file (a server that trusted it read and deleted it)."""
    return {Key.DELTA + "-file": ConfigRecord({"path": str(run_dir / "checkpoint.pt"), "bytes": 1})}


def _fifo(msg: Message, run_dir: Path) -> dict:
    """A FIFO at the very name the server issued: reading it would hang the server for ever."""
    folder = Path(str(msg.content[Key.ARRAYS + "-file"]["path"])).parent
    path = folder / f"{Key.DELTA}-{reply_tag(msg.content)}.pt"
    path.unlink(missing_ok=True)  # the honest client's file (or the FIFO of the first try: a resend, same name)
    os.mkfifo(path)
    return {Key.DELTA + "-file": ConfigRecord({"path": str(path), "bytes": 1})}


def _tensors(value) -> callable:
    def tamper(msg: Message, run_dir: Path) -> dict:
        return {Key.DELTA: encode(value(msg))}

    return tamper


def _dense_like(msg: Message, fill: float) -> dict:
    sent = msg.content[Key.ARRAYS]
    return {name: torch.full(tuple(array.shape), fill) for name, array in sent.items()}


TAMPERS = {
    "the run's checkpoint": ("files", _victim),
    "a FIFO": ("files", _fifo),
    "a [1]-shaped tensor": ("messages", _tensors(lambda msg: {Form.FLAT: torch.ones(1)})),
    "a missing tensor": ("messages", _tensors(lambda msg: dict(list(_dense_like(msg, 0.0).items())[1:]))),
    "NaN": ("messages", _tensors(lambda msg: _dense_like(msg, float("nan")))),
    "Inf": ("messages", _tensors(lambda msg: _dense_like(msg, float("inf")))),
}


class TamperingGrid(InProcessGrid):
    """The real ClientApp behind every node, but the lowest sampled partition's train replies are replaced by
    `tamper`'s content (the first `times` of them; None: all)."""

    def __init__(self, cfg, tamper, times=None):
        super().__init__(cfg)
        self.tamper, self.times, self.run_dir = tamper, times, Path(cfg.run_dir)

    def answer(self, messages):
        replies = super().answer(messages)
        for i, (msg, reply) in enumerate(zip(messages, replies)):
            if msg.metadata.message_type != "train" or self.times == 0 or i != 0:
                continue
            self.times = None if self.times is None else self.times - 1
            content = {Key.METRICS: reply.content[Key.METRICS], **self.tamper(msg, self.run_dir)}
            if Key.DELTA + "-file" in reply.content and Key.DELTA + "-file" not in content:  # not sent: gone
                Path(str(reply.content[Key.DELTA + "-file"]["path"])).unlink(missing_ok=True)
            replies[i] = Message(RecordDict(content), reply_to=msg)
        return replies


@pytest.mark.parametrize("what", [w for w in TAMPERS if w not in ("NaN", "Inf")])
def test_a_reply_that_cannot_count_fails_its_client_and_touches_nothing(tmp_path, what):
    transport, tamper = TAMPERS[what]
    cfg = fl_cfg(tmp_path, "run", transport=transport, **{"max-retries": 1, "num-rounds": 2})
    play_server_app()
    with pytest.raises(RoundFailedError, match=r"round 1: clients \[\d+\] failed after 1 retries \(its reply was "
                                               r"refused: "):
        server_app.run(TamperingGrid(cfg, tamper), cfg)
    run_dir = tmp_path / "run"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # still there, still round 0's
    assert checkpoint["round"] == 0 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == 1  # round 0 alone: round 1 wrote nothing


@pytest.mark.parametrize("what", ["NaN", "Inf"])
def test_a_client_whose_updates_stay_non_finite_stops_the_run_as_diverged_with_nothing_averaged(tmp_path, what):
    transport, tamper = TAMPERS[what]  # what a training that blew up sends, resent or not
    cfg = fl_cfg(tmp_path, "run", transport=transport, **{"max-retries": 1, "num-rounds": 2})
    play_server_app()
    server_app.run(TamperingGrid(cfg, tamper), cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "DIVERGED").read_text().startswith("clients [") and not (run_dir / "DONE").exists()
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 0
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # round 0's: nothing was averaged
    assert checkpoint["round"] == 0 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())


@pytest.mark.parametrize("what", ["the run's checkpoint", "NaN"])
def test_a_client_that_misbehaves_once_and_then_answers_leaves_the_run_as_if_it_never_had(tmp_path, what):
    transport, tamper = TAMPERS[what]
    settings = {"transport": transport, "max-retries": 1, "num-rounds": 2}
    honest = run_in_process(fl_cfg(tmp_path, "honest", **settings))
    cfg = fl_cfg(tmp_path, "once", **settings)
    play_server_app()
    server_app.run(TamperingGrid(cfg, tamper, times=1), cfg)
    a = torch.load(honest / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class QueryTamperingGrid(InProcessGrid):
    """The real ClientApp, but partition 0's replies to messages of `message_type` carry `record` under `key`."""

    def __init__(self, cfg, message_type, key, record):
        super().__init__(cfg)
        self.message_type, self.key, self.record = message_type, key, record

    def answer(self, messages):
        replies = super().answer(messages)
        for i, (msg, reply) in enumerate(zip(messages, replies)):
            if msg.metadata.message_type == self.message_type and i == 0:
                replies[i] = Message(RecordDict({**reply.content, self.key: self.record}), reply_to=msg)
        return replies


@pytest.mark.parametrize("message_type, key, record, settings", [
    ("query.ridge", "stats", ArrayRecord({"xtx": torch.full((3, 3), float("nan"))}), {"head": "ridge"}),
    ("query.logistic", "sums", ArrayRecord({"loss": torch.tensor(float("inf"), dtype=torch.float64)}),
     {"head": "logistic"}),
    ("query.fisher", "sums", ArrayRecord({Form.FLAT: torch.ones(1)}),
     {"head": "logistic", "optimizer": "sparse-sgdm", "calibration-rounds": 1}),
    ("evaluate", "metrics", MetricRecord({"partition-id": 0, "num-examples": 0, "loss": float("nan"),
                                          "accuracy": 7.0}), {"fraction-evaluate": 0.2}),
])
def test_step_0_calibration_and_evaluation_replies_are_checked_before_they_count(tmp_path, message_type, key, record,
                                                                               settings):
    cfg = fl_cfg(tmp_path, "run", transport="messages", **{"max-retries": 0, "num-rounds": 2, **settings})
    play_server_app()
    with pytest.raises(RoundFailedError, match=r"its reply was refused: "):
        server_app.run(QueryTamperingGrid(cfg, message_type, key, record), cfg)
    honest = fl_cfg(tmp_path, "honest", transport="messages", **{"max-retries": 0, "num-rounds": 2, **settings})
    run_in_process(honest)  # the same queries answered as the ClientApp answers them all count: the run ends
    assert RunDir(tmp_path / "honest").finished  # (DONE, or DIVERGED: a ridge head fine-tuned at lr 0.05 may)

"""Shared fixtures and helpers: tiny synthetic run configs (TINY, FL), Flower process checks, CUDA gating for `gpu` tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_app.config import RunConfig
from fed_app.local_federation import LocalFederation, processes_under
from fed_app.session import Session
from strategies.fedavg import one_torch_thread

TINY = {
    "dataset": "synthetic", "model": "vit-tiny-test", "synthetic-train-size": 3200,
    "synthetic-test-size": 300, "val-size": 200, "batch-size": 32, "eval-batch-size": 256,
    "epochs": 2, "lr": 0.05, "device": "cpu",
}

FL = {**TINY, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 4, "eval-every": 2, "checkpoint-every": 2,
      "local-steps": 2}  # a small federation: 3 of 10 clients a round


def fl_cfg(tmp_path, name, **changes) -> RunConfig:
    """The small federation's config with `changes`, its run folder tmp_path/name."""
    return RunConfig.from_run_config({**FL, **changes, "run-dir": str(tmp_path / name)})


class PushPullGrid:
    """What fedit's Federation uses of a Flower Grid (push_messages, pull_messages, send_and_receive) over a
    synchronous `answer(messages) -> replies` that a test double writes: each pushed message gets an id, as
    Flower's grids give it, and is answered at the next pull."""

    def answer(self, messages):
        raise NotImplementedError

    def push_messages(self, messages):
        queued, ids = self.__dict__.setdefault("_queued", []), []
        for msg in messages:
            self.__dict__["_count"] = self.__dict__.get("_count", 0) + 1
            msg.metadata.__dict__["_message_id"] = f"message-{self._count}"
            queued.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        queued = self.__dict__.setdefault("_queued", [])
        batch = [m for m in queued if m.metadata.message_id in wanted]
        self._queued = [m for m in queued if m.metadata.message_id not in wanted]
        return self.answer(batch) if batch else []

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


class InProcessGrid(PushPullGrid):
    """A federation inside the test process: the real ClientApp answers every message with its node's own
    Context (partition id, run config, node state), as a SuperNode does. For tests of the server's and
    clients' arithmetic over whole runs (fed_app.server_app.run) without Flower's processes; `flwr run` itself
    is tested in tests/fed_app/test_server_app.py. `fail_after`: the grid goes away (RuntimeError) after
    answering that many train messages, as a stopped machine does mid-round."""

    def __init__(self, cfg: RunConfig, fail_after: int | None = None):
        from flwr.app import Context, RecordDict

        self.contexts = {1000 + p: Context(1, 1000 + p, {"partition-id": p}, RecordDict(), cfg.to_run_config())
                         for p in range(cfg.num_clients)}
        self.fail_after, self.trained = fail_after, 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def answer(self, messages):
        from fed_app.client_app import app

        replies = []
        for msg in messages:
            if msg.metadata.message_type == "train":
                if self.trained == self.fail_after:
                    raise RuntimeError("the federation went away")
                self.trained += 1
            with one_torch_thread():  # as a Ray actor with one CPU (OMP_NUM_THREADS=1): the same sums, in order
                replies.append(app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def run_in_process(cfg: RunConfig) -> Path:
    """`cfg` run to its end by the real ServerApp and ClientApp in this process (InProcessGrid): the reference
    that a run under `flwr run` must end equal to, bit for bit, without paying Flower's start-up."""
    from fed_app import server_app

    play_server_app()
    server_app.run(InProcessGrid(cfg), cfg)
    return Path(cfg.run_dir)


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    return RunConfig.from_run_config({**TINY, "run-dir": str(tmp_path / "run")})


@pytest.fixture(scope="session")
def flower_session(tmp_path_factory):
    """One Flower simulation of 10 nodes (fed_app/session.py) that runs the tests' runs in turn, as the runner
    runs a slot's: Flower's start-up paid once. `flower_session.run(cfg)`; a failed run starts a new one."""
    with LocalFederation(tmp_path_factory.mktemp("flwr")) as sim:
        session = Session(sim)
        yield session
        session.close()


def flower_processes_under(base: Path) -> list[int]:
    """The processes whose FLWR_HOME lies under `base`: what a stopped command must leave none of."""
    return processes_under(lambda home: str(home).startswith(str(base)))


def play_server_app() -> None:
    """This test process plays a ServerApp's process: a Flower message takes its sender's run, node and task
    from the process identity, which Flower's runtimes set through these public setters before a ServerApp
    starts (flwr.server.compat.app does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="session")
def server_app_identity() -> None:
    play_server_app()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

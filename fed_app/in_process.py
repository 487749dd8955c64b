"""A federation inside one process: the real ClientApp answers every message with its node's own Context
(partition id, run config, node state), as a SuperNode does, so that whole runs of the real ServerApp
(`server_app.run`) take seconds without Flower's processes. The reference that a run under `flwr run` must end
equal to, bit for bit (the tests), and the engine of the miniature study (experiments/miniature.py)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from fed_app.config import RunConfig
from strategies.fedavg import one_torch_thread


class PushPullGrid:
    """What fedit's Federation uses of a Flower Grid (push_messages, pull_messages, send_and_receive) over a
    synchronous `answer(messages) -> replies`: each pushed message gets an id, as Flower's grids give it, and is
    answered at the next pull."""

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
    """The real ClientApp behind every node of `cfg`'s federation, in this process. `fail_after`: the grid goes
    away (RuntimeError) after answering that many train messages, as a stopped machine does mid-round."""

    registers_nodes_at_once = True  # as Flower's simulation does: a node count that holds is final

    def __init__(self, cfg: RunConfig, fail_after: int | None = None):
        self.contexts = {1000 + p: Context(1, 1000 + p, {"partition-id": p}, RecordDict(), cfg.to_run_config())
                         for p in range(cfg.num_clients)}
        self.fail_after, self.trained = fail_after, 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def answer(self, messages):
        from fed_app.client_app import app  # the ClientApp's module imports Flower's client runtime: only here

        replies = []
        for msg in messages:
            if msg.metadata.message_type == "train":
                if self.trained == self.fail_after:
                    raise RuntimeError("the federation went away")
                self.trained += 1
            with one_torch_thread():  # as a Ray actor with one CPU (OMP_NUM_THREADS=1): the same sums, in order
                replies.append(app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def play_server_app() -> None:
    """This process plays a ServerApp's process: a Flower message takes its sender's run, node and task from the
    process identity, which Flower's runtimes set through these public setters before a ServerApp starts
    (flwr.server.compat.app does the same)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def run_in_process(cfg: RunConfig) -> Path:
    """`cfg` run to its end (or resumed) by the real ServerApp and ClientApp in this process."""
    from fed_app import server_app

    play_server_app()
    server_app.run(InProcessGrid(cfg), cfg)
    return Path(cfg.run_dir)

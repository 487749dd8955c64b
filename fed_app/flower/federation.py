"""Reaching the clients of a federation: partition id <-> node id, messages out and replies back in
partition order, failed or silent clients resent up to max-retries then one sentence naming them, and the
payload bytes each exchange moved. No sampling and no arithmetic: that is the strategy's."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_app.config import ConfigError, RunConfig
from fed_app.flower.payload import Key, payload_bytes
from fed_app.flower.replies import BadReplyError

log = logging.getLogger(__name__)

SETTLE_S = 3.0  # Flower's simulation: once this long with no new node, the federation is all there

# How often the server asks for replies while it waits: every POLL_MIN_S after a reply came, doubling while
# none do, up to POLL_MAX_S. A fixed 10 ms poll cost the ServerApp's process 0.43 CPU-s a 5 s round on a
# 2-core CPU (results/benchmarks.md), which the clients then lack; the backoff keeps most of its promptness.
POLL_MIN_S, POLL_MAX_S = 0.01, 0.05


class RoundFailedError(RuntimeError):
    """Fewer clients answered than were asked, after the allowed retries; `reasons`: each failed client's last."""

    def __init__(self, message: str, reasons: dict[int, str] | None = None):
        super().__init__(message)
        self.reasons = reasons or {}


@dataclass
class Exchange:
    """The replies of one exchange, in partition order, and the payload bytes it moved each way."""

    replies: list[Message]
    bytes_sent: int
    bytes_received: int


class Federation:
    """The grid and its partition -> node map, with the run's retry policy."""

    def __init__(self, grid: Grid, nodes: dict[int, int], examples: dict[int, int], max_retries: int,
                 timeout: float, cfg: RunConfig | None = None):
        self.grid, self.nodes = grid, nodes
        self.run = run_record(cfg)  # every message names its run's config: one simulation may serve many runs
        self.examples = examples  # partition id -> its training images, as its node reported them
        self.max_retries, self.timeout = max_retries, timeout
        self.bytes_sent = self.bytes_received = 0  # totals over the run's exchanges (a row takes differences)

    @classmethod
    def discover(cls, grid: Grid, cfg: RunConfig, wait_s: float = 30.0) -> Federation:
        """Ask every connected node which partition it holds; all of 0..K-1 must be there, once each. Nodes of a
        deployment connect over `wait_s`; Flower's simulation registers all of its nodes at once as it starts, so
        there a count that holds for SETTLE_S is final."""
        started = time.monotonic()
        # the simulation's grid (flwr.superlink.grid), or a grid that says so (fed_app/in_process.py)
        simulated = getattr(grid, "registers_nodes_at_once", type(grid).__name__ == "InMemoryGrid")
        seen, since = -1, started
        while len(node_ids := list(grid.get_node_ids())) < cfg.num_clients:
            now = time.monotonic()
            if len(node_ids) != seen:
                seen, since = len(node_ids), now
            if now - started > wait_s or (simulated and seen > 0 and now - since > SETTLE_S):
                break
            time.sleep(0.5)
        if len(node_ids) != cfg.num_clients:
            waited = time.monotonic() - started
            raise _wrong_federation(cfg, f"{len(node_ids)} nodes are connected after {waited:.0f}s")
        run = run_record(cfg)  # one JSON text for all K queries
        queries = [Message(RecordDict(run), node, MessageType.QUERY) for node in node_ids]
        nodes, examples = {}, {}
        for reply in grid.send_and_receive(queries, timeout=cfg.round_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                                   f"{reply.error.reason}")
            info = reply.content[Key.INFO]
            nodes[int(info[Key.PARTITION_ID])] = reply.metadata.src_node_id
            examples[int(info[Key.PARTITION_ID])] = int(info[Key.NUM_EXAMPLES])
        if sorted(nodes) != list(range(cfg.num_clients)):
            raise _wrong_federation(cfg, f"the federation's {len(node_ids)} nodes hold partitions "
                                         f"{sorted(nodes)[:5]}...")
        retries = cfg.max_retries if cfg.on_client_failure == "retry" else 0
        return cls(grid, nodes, examples, retries, cfg.round_timeout, cfg)

    def exchange(self, server_round: int, message_type: str, records: dict[int, RecordDict],
                 consume: Callable[[Message], None] | None = None,
                 check: Callable[[int, Message], None] | None = None) -> Exchange:
        """Send each partition its record; resend to one whose reply is an error or does not come within
        round-timeout, up to max-retries times; every reply, in partition order. Replies are polled every
        10 to 50 ms (POLL_MIN_S after a reply, backing off to POLL_MAX_S; Flower's own send_and_receive sleeps 3 s
        between polls on the deployment engine and 0.1 s in the simulation) and handed to `consume` in partition
        order as soon as each one and every earlier one have come: the server adds up updates while later
        clients still train. `check(pid, reply)` sees each reply first: a BadReplyError (fed_app/flower/replies.py)
        fails that client as an error reply does, and it never reaches `consume`."""
        order = sorted(records)
        tries = dict.fromkeys(order, 0)
        waiting: dict[str, tuple[int, float]] = {}  # message id -> (partition, when it is given up on)
        replies: dict[int, Message] = {}
        reasons: dict[int, str] = {}
        failed: list[int] = []
        sent = self._push(records, order, message_type, waiting)
        handed, interval = 0, POLL_MIN_S
        while waiting:
            came = list(self.grid.pull_messages(list(waiting)))
            again = []
            for reply in came:
                pid, _ = waiting.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    again.append((pid, reply.error.reason))
                elif (refused := _refusal(check, pid, reply)) is not None:
                    again.append((pid, refused))
                else:
                    replies[pid] = reply
            now = time.monotonic()
            for message_id, (pid, deadline) in list(waiting.items()):
                if now > deadline:
                    del waiting[message_id]
                    again.append((pid, f"no reply within round-timeout={self.timeout}s"))
            retry = []
            for pid, reason in again:
                reasons[pid], tries[pid] = reason, tries[pid] + 1
                log.warning("round %d: client %d failed (attempt %d/%d): %s", server_round, pid, tries[pid],
                            self.max_retries + 1, reason)
                (retry if tries[pid] <= self.max_retries else failed).append(pid)
            if retry:
                sent += self._push(records, retry, message_type, waiting)
            while consume is not None and handed < len(order) and order[handed] in replies:
                consume(replies[order[handed]])
                handed += 1
            if came:
                interval = POLL_MIN_S
            elif waiting:
                time.sleep(interval)
                interval = min(2 * interval, POLL_MAX_S)
        if failed:
            failed.sort()
            raise RoundFailedError(
                f"round {server_round}: clients {failed} failed after {self.max_retries} retries "
                f"({reasons[failed[0]]}); rerun the same command to resume, or raise max-retries.",
                {pid: reasons[pid] for pid in failed})
        ordered = [replies[p] for p in order]
        received = sum(payload_bytes(r) for m in ordered for r in m.content.values())
        self.bytes_sent += sent
        self.bytes_received += received
        return Exchange(ordered, sent, received)

    def _push(self, records: dict[int, RecordDict], pids: list[int], message_type: str,
              waiting: dict[str, tuple[int, float]]) -> int:
        """Push these partitions' messages, noting each as awaited; the payload bytes pushed."""
        ids = self.grid.push_messages(self._messages({p: records[p] for p in pids}, message_type))
        deadline = time.monotonic() + self.timeout
        for pid, message_id in zip(pids, ids):
            waiting[message_id] = (pid, deadline)
        return sum(payload_bytes(r) for p in pids for r in records[p].values())

    def _messages(self, records: dict[int, RecordDict], message_type: str) -> list[Message]:
        return [Message(RecordDict({**record, **self.run}), self.nodes[p], message_type)
                for p, record in records.items()]


def _refusal(check: Callable[[int, Message], None] | None, pid: int, reply: Message) -> str | None:
    """Why `check` refuses the reply of partition `pid`, or None when it counts."""
    if check is None:
        return None
    try:
        check(pid, reply)
    except BadReplyError as err:
        return f"its reply was refused: {err}"
    return None


def run_record(cfg: RunConfig | None) -> dict[str, ConfigRecord]:
    """Message content naming the run's whole config (Key.RUN), which clients read before their context's."""
    return {Key.RUN: ConfigRecord({Key.CONFIG_JSON: json.dumps(cfg.to_run_config())})} if cfg is not None else {}


def _wrong_federation(cfg: RunConfig, found: str) -> ConfigError:
    return ConfigError(f"num-clients={cfg.num_clients} but {found}; start exactly {cfg.num_clients} supernodes "
                       f"with partition-id 0..{cfg.num_clients - 1} (simulation: --federation-config "
                       f"\"num-supernodes={cfg.num_clients}\").")

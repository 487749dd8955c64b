"""Reaching the clients of a federation: partition id <-> node id, messages out and replies back in
partition order, failed or silent clients resent up to max-retries then one sentence naming them, and the
payload bytes each exchange moved. No sampling and no arithmetic: that is the strategy's."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_app.config import ConfigError, RunConfig
from fed_app.transport import payload_bytes
from fed_app.wire import Key

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """Fewer clients answered than were asked, after the allowed retries."""


@dataclass
class Exchange:
    """The replies of one exchange, in partition order, and the payload bytes it moved each way."""

    replies: list[Message]
    bytes_sent: int
    bytes_received: int


class Federation:
    """The grid and its partition -> node map, with the run's retry policy."""

    def __init__(self, grid: Grid, nodes: dict[int, int], max_retries: int, timeout: float):
        self.grid, self.nodes = grid, nodes
        self.partition_of = {node: pid for pid, node in nodes.items()}
        self.max_retries, self.timeout = max_retries, timeout
        self.bytes_sent = self.bytes_received = 0  # totals over the run's exchanges (a row takes differences)

    @classmethod
    def discover(cls, grid: Grid, cfg: RunConfig, wait_s: float = 30.0) -> Federation:
        """Ask every connected node which partition it holds; all of 0..K-1 must be there, once each."""
        deadline = time.monotonic() + wait_s
        while len(node_ids := list(grid.get_node_ids())) < cfg.num_clients and time.monotonic() < deadline:
            time.sleep(0.5)
        if len(node_ids) != cfg.num_clients:
            raise _wrong_federation(cfg, f"{len(node_ids)} nodes are connected after {wait_s:.0f}s")
        queries = [Message(RecordDict(), node, MessageType.QUERY) for node in node_ids]
        nodes = {}
        for reply in grid.send_and_receive(queries, timeout=cfg.round_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                                   f"{reply.error.reason}")
            nodes[int(reply.content[Key.INFO][Key.PARTITION_ID])] = reply.metadata.src_node_id
        if sorted(nodes) != list(range(cfg.num_clients)):
            raise _wrong_federation(cfg, f"the federation's {len(node_ids)} nodes hold partitions "
                                         f"{sorted(nodes)[:5]}...")
        retries = cfg.max_retries if cfg.on_client_failure == "retry" else 0
        return cls(grid, nodes, retries, cfg.round_timeout)

    def exchange(self, server_round: int, message_type: str, records: dict[int, RecordDict]) -> Exchange:
        """Send each partition its record; resend to those that failed (up to max-retries); every reply."""
        messages = self._messages(records, message_type)
        sent = sum(payload_bytes(r) for record in records.values() for r in record.values())
        replies: dict[int, Message] = {}
        reasons: dict[int, str] = {}
        for attempt in range(self.max_retries + 1):
            for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
                pid = self.partition_of[reply.metadata.src_node_id]
                if reply.has_error():
                    reasons[pid] = reply.error.reason
                else:
                    replies[pid] = reply
            missing = [p for p in records if p not in replies]
            if not missing:
                break
            for p in missing:
                reasons.setdefault(p, f"no reply within round-timeout={self.timeout}s")
            log.warning("round %d: clients %s failed (attempt %d/%d): %s", server_round, missing, attempt + 1,
                        self.max_retries + 1, "; ".join(f"{p}: {reasons[p]}" for p in missing))
            messages = self._messages({p: records[p] for p in missing}, message_type)
            sent += sum(payload_bytes(r) for p in missing for r in records[p].values())
        else:
            raise RoundFailedError(
                f"round {server_round}: clients {missing} failed after {self.max_retries} retries "
                f"({reasons[missing[0]]}); rerun the same command to resume, or raise max-retries."
            )
        ordered = [replies[p] for p in sorted(records)]
        received = sum(payload_bytes(r) for m in ordered for r in m.content.values())
        self.bytes_sent += sent
        self.bytes_received += received
        return Exchange(ordered, sent, received)

    def query(self, server_round: int, action: str, record: RecordDict, pids: list[int]) -> Exchange:
        """A `query.<action>` with the same record to these partitions."""
        return self.exchange(server_round, f"{MessageType.QUERY}.{action}", {p: record for p in pids})

    def _messages(self, records: dict[int, RecordDict], message_type: str) -> list[Message]:
        return [Message(record, self.nodes[p], message_type) for p, record in records.items()]


def _wrong_federation(cfg: RunConfig, found: str) -> ConfigError:
    return ConfigError(f"num-clients={cfg.num_clients} but {found}; start exactly {cfg.num_clients} supernodes "
                       f"with partition-id 0..{cfg.num_clients - 1} (simulation: --federation-config "
                       f"\"num-supernodes={cfg.num_clients}\").")

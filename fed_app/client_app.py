"""ClientApp: thin adapters between Flower messages and the cached worker's task code."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_app.config import ConfigError, RunConfig
from fed_app.worker import get_worker

app = ClientApp()


def _partition_id(context: Context, cfg: RunConfig) -> int:
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < cfg.num_clients:
        raise ConfigError(f"this supernode's partition-id={pid} is outside num-clients={cfg.num_clients}; "
                          f"give supernodes partition ids 0..{cfg.num_clients - 1}.")
    return pid


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which shard this node owns."""
    cfg = RunConfig.from_run_config(context.run_config)
    info = ConfigRecord({"partition-id": _partition_id(context, cfg)})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """J local steps from the received global model; reply with the delta and the example count."""
    cfg = RunConfig.from_run_config(context.run_config)
    pid = _partition_id(context, cfg)
    worker = get_worker(cfg)
    server_round = int(msg.content["config"]["server-round"])
    delta, loss, examples = worker.local_update(msg.content["arrays"].to_torch_state_dict(), pid, server_round)
    metrics = MetricRecord({"train_loss": loss, "num-examples": examples, "partition-id": pid,
                            "worker-builds": worker.builds})
    return Message(RecordDict({"delta": ArrayRecord(delta), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The received model's loss and accuracy on this client's own shard."""
    cfg = RunConfig.from_run_config(context.run_config)
    pid = _partition_id(context, cfg)
    worker = get_worker(cfg)
    result = worker.evaluate(msg.content["arrays"].to_torch_state_dict(), worker.shard(pid))
    metrics = MetricRecord({"loss": result["loss"], "accuracy": result["accuracy"],
                            "num-examples": len(worker.shards[pid])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

"""ClientApp as Flower's examples write it: load the received ArrayRecord into the model, train, reply with
ArrayRecord(model.state_dict()) and num-examples. Kept honest: the model and data are built once per process
(not per message), batches are index slices of device tensors (no DataLoader), and the J steps are fedit's own
(`task.train_steps` on fedit's shards and batches), so that only the plumbing differs from fedit."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_app.task.batches import batch_stream
from fed_app.config import RunConfig
from fed_app.flower.loaded_task import load_task
from fed_app.task.seeds import client_generator
from fed_app.task.train import autocast, make_optimizer, train_steps

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(json.loads(str(context.run_config["fedit-config"])))
    task = load_task(cfg)  # model, data and shards: once per process
    pid = int(context.node_config["partition-id"])
    task.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"]["server-round"])
    generator = client_generator(task.device, cfg.seed, server_round, pid, False)
    shard = task.shards[pid]
    loss = train_steps(task.trainer, make_optimizer(cfg, task.model), task.data.train,
                       batch_stream(shard, cfg.batch_size, generator), cfg.local_steps, task.train_tf, generator,
                       autocast(cfg, task.device))
    content = RecordDict({"arrays": ArrayRecord(task.model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(shard)})})
    return Message(content=content, reply_to=msg)

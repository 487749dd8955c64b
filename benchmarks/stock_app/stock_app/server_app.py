"""ServerApp as Flower's examples write it: build the model, hand its ArrayRecord to Flower's built-in FedAvg
and run `strategy.start` for the rounds; save the final model. The only addition is a clock: the evaluate_fn
that FedAvg calls after every round records when each round ended, for the benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fed_app.config import RunConfig
from fed_app.task.data import NUM_CLASSES
from fed_app.task.model import build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(json.loads(str(context.run_config["fedit-config"])))
    model, _ = build_model(cfg, NUM_CLASSES)
    ended: list[float] = []

    def clock(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        ended.append(time.time())  # epoch seconds: the benchmark compares them with its own clock
        return MetricRecord()

    strategy = FedAvg(fraction_train=cfg.fraction_train, fraction_evaluate=0.0, min_available_nodes=cfg.num_clients)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
                            train_config=ConfigRecord({"lr": cfg.lr}), evaluate_fn=clock)
    out = Path(str(context.run_config["timings"]))
    torch.save(result.arrays.to_torch_state_dict(), out.with_name("final_model.pt"))
    out.write_text(json.dumps({"round_ended": ended}))

"""Step 0 in FL, server side, through the real ServerApp and ClientApp in process: the logistic head equals the
centralized fit on the union of the shards, and its queries carry only the head."""

import json

import torch

from fed_app.task.batches import BatchTransform
from fed_app.task.data import load_dataset
from fed_app.task.editing import fit_head
from fed_app.task.model import build_model

from ..conftest import fl_cfg, run_in_process


def test_the_federated_logistic_head_equals_the_centralized_fit_and_only_the_head_travels(tmp_path):
    cfg = fl_cfg(tmp_path, "run", head="logistic", lr=0.01, **{"num-rounds": 1, "head-iterations": 30})
    run = run_in_process(cfg)
    final = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    row0 = json.loads((run / "rows.jsonl").read_text().splitlines()[0])

    data = load_dataset(cfg, torch.device("cpu"))
    model, spec = build_model(cfg, 100)
    tf = BatchTransform.for_model(spec)
    found = fit_head(cfg, model, data.train, torch.arange(len(data.train)), tf, tf,
                     torch.autocast("cpu", enabled=False), 100)
    torch.testing.assert_close(final["head.weight"], model.head.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(final["head.bias"], model.head.bias.detach(), rtol=1e-6, atol=1e-7)
    assert row0["head_evaluations"] == found["head_evaluations"] > 5
    head_bytes = 8 * (final["head.weight"].numel() + final["head.bias"].numel())  # float64, weight and bias
    assert row0["bytes_sent"] == 10 * found["head_evaluations"] * head_bytes  # 10 clients; no model travels

"""Extension points: a mask rule, a client objective, an aggregation rule and a federated method registered from
outside the package (tests/plugins/example.py), checked against hand computations and FedAvg's own run, and run
end to end through `flwr run`."""

import json

import pytest
import torch
import torch.nn.functional as F

from fed_app import server_app
from fed_app.applicability import applies
from fed_app.config import ConfigError, RunConfig
from fed_app.task.model import build_model
from fed_app.registry import AGGREGATIONS, OBJECTIVES
from masking.calibrate import calibrate
from strategies.fedavg import weighted_average
from fed_app.runs.rundir import RunDir

from ..conftest import TINY, InProcessGrid, fl_cfg

PLUGIN = {"plugins": "tests.plugins.example"}


def test_a_registered_name_is_refused_until_its_module_is_named_in_plugins():
    with pytest.raises(ConfigError, match=r"mask-rule='by-position' is not one of .*a module in plugins registers"):
        RunConfig(mask_rule="by-position", optimizer="sparse-sgdm", head="ridge")
    cfg = RunConfig(mask_rule="by-position", optimizer="sparse-sgdm", head="ridge", client_objective="proximal",
                    aggregation="half-step", plugins=PLUGIN["plugins"])
    assert not applies(cfg, "fisher_mode", "federated")  # the rule says it needs no Fisher
    with pytest.raises(ConfigError, match=r"plugins='no_such_module' cannot be imported"):
        RunConfig(aggregation="nope", plugins="no_such_module")


def test_the_plugin_rule_objective_and_aggregation_do_what_they_say():
    RunConfig(plugins=PLUGIN["plugins"], aggregation="half-step")  # imports the plugin
    model, _ = build_model(RunConfig(model="vit-tiny-test"), 10)
    model.head.requires_grad_(False)
    masks = calibrate(model, "by-position", 0.7, 2, score_fn=None, seed=0)
    for m in masks.values():  # keep-lowest by position: every tensor's trainable entries are a prefix
        flat = m.flatten().int()
        assert torch.equal(flat, flat.sort(descending=True).values)

    objective = OBJECTIVES.get("proximal")(model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    logits = model(x)
    drift = 0.5 ** 2 * model.blocks[0].mlp.fc1.weight.numel()
    assert objective(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item() + 0.1 / 2 * drift,
                                                        rel=1e-5)

    deltas, weights = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}], [1.0, 3.0]
    half = AGGREGATIONS.get("half-step")(sum(weights))
    for d, w in zip(deltas, weights):
        half.add(d, w)
    assert torch.equal(half.result()["w"], 0.5 * weighted_average(deltas, weights)["w"])


@pytest.mark.slow
def test_a_plugin_registered_from_outside_the_package_runs_end_to_end(tmp_path, flower_session):
    cfg = RunConfig.from_run_config({**TINY, **PLUGIN, "num-clients": 10, "fraction-train": 0.3, "num-rounds": 2,
                                     "eval-every": 1, "local-steps": 2, "optimizer": "sparse-sgdm", "head": "ridge",
                                     "lr": 0.01, "sparsity": 0.8, "calibration-rounds": 2,
                                     "mask-rule": "by-position", "client-objective": "proximal",
                                     "aggregation": "half-step", "client-algorithm": "doubled-delta",
                                     "run-dir": str(tmp_path / "run")})
    flower_session.run(cfg)  # a simulation whose workers started before the run named the plugin
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["train_loss"] > 0 for r in rows[1:])
    for m in RunDir(tmp_path / "run").load_mask().values():  # the server calibrated with the plugin's rule
        flat = m.flatten().int()
        assert torch.equal(flat, flat.sort(descending=True).values)


def _rows(run_dir):  # seconds and task builds differ from run to run
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time") and k != "task_builds"}
            for line in (run_dir / "rows.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("server_app_identity")
def test_a_method_registered_from_outside_runs_its_client_and_server_hooks(tmp_path):
    """Both hooks of the plugin's method ran, in the real ServerApp and ClientApp: with only the client's doubling
    the run would move twice as far, with only the server's halving half as far; with both it is FedAvg's run."""
    plugin = fl_cfg(tmp_path, "plugin", **PLUGIN, **{"client-algorithm": "doubled-delta", "prox-mu": 0.01})
    assert applies(plugin, "prox_mu", "federated")  # a FedAvg-family method reads FedAvg's settings
    server_app.run(InProcessGrid(plugin), plugin)
    fedavg = fl_cfg(tmp_path, "fedavg", **{"prox-mu": 0.01})
    server_app.run(InProcessGrid(fedavg), fedavg)
    assert _rows(tmp_path / "plugin") == _rows(tmp_path / "fedavg")
    a = torch.load(tmp_path / "plugin" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fedavg" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ConfigError, match=r"client-algorithm='nope' is not one of fedavg, scaffold, or a name that"):
        fl_cfg(tmp_path, "x", **{"client-algorithm": "nope"})

"""The study in miniature: manifests shrunk as stated and run in dependency order; a slice run end to end."""

import pandas as pd
import pytest
import yaml

from experiments.miniature import BASE, order, shrink, study
from fed_app.errors import UserError

TUNE = """
name: tune
kind: federated
base: {model: vit-small-dino, head: logistic, freeze-head: false, num-rounds: 60, local-steps: 4}
grid: {lr: [0.003, 0.03, 0.3]}
seeds: [42]
"""
STUDY = """
name: compare
kind: federated
base: {model: vit-small-dino, head: logistic, freeze-head: false, num-rounds: 60, local-steps: 4}
tuned-from: {manifest: tune, keys: [lr]}
control: {partition: iid}
grid:
  - {partition: [iid]}
  - {partition: [noniid], classes-per-client: [50]}
seeds: [42, 43]
"""


def test_a_manifest_shrinks_its_rounds_epochs_and_classes_and_keeps_its_grid_seeds_and_control():
    raw = yaml.safe_load(STUDY)
    small = shrink({**raw, "base": {**raw["base"], "epochs": 10}}, "/w.pth")
    assert small["base"]["num-rounds"] == 6 and small["base"]["epochs"] == 5
    assert small["base"]["model"] == "vit-tiny-test" and small["base"]["model-weights"] == "/w.pth"
    assert small["grid"][1] == {"partition": ["noniid"], "classes-per-client": [10]}  # digits have 10 classes
    assert small["seeds"] == [42, 43] and small["control"] == {"partition": "iid"}
    assert small["tuned-from"] == raw["tuned-from"]
    assert order({"compare": raw, "tune": yaml.safe_load(TUNE)}) == ["tune", "compare"]


@pytest.mark.slow
def test_a_slice_of_the_miniature_runs_tuning_first_then_the_study_its_report_and_summary(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "tune.yaml").write_text(TUNE)
    (manifests / "compare.yaml").write_text(STUDY)
    with pytest.raises(UserError, match=r"--only 'nope' is not a manifest"):
        study(manifests, tmp_path / "results", only=["nope"])
    summary = study(manifests, tmp_path / "results", only=["compare"], workers=2).read_text()
    assert "## tune" in summary and "## compare" in summary and summary.index("## tune") < summary.index("## compare")
    assert "**Best federated configuration by validation accuracy:** lr=" in summary
    assert "| partition=noniid classes-per-client=10 | partition=iid | 2 |" in summary  # paired by seed
    runs = pd.read_csv(tmp_path / "results" / "compare" / "summary.csv")
    assert len(runs) == 4 and (runs["num_clients"] == BASE["num-clients"]).all()
    tuned = pd.read_csv(tmp_path / "results" / "tune" / "by_config.csv")
    best = tuned.loc[tuned["val_accuracy_mean"].idxmax(), "lr"]
    assert (runs["lr"] == best).all()  # the study ran at the tuning manifest's validation winner
    iid = runs[runs["partition"] == "iid"]
    assert (iid["test_loss"] < iid["step0_test_loss"]).all()  # and learned

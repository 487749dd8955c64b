"""Paired statistics: each arm against its control over the same seeds, with a hand-computed t-interval."""

import json
from pathlib import Path

import pandas as pd
import pytest

from experiments.manifest import load_manifest
from experiments.report import write_report

MANIFEST = """
name: study
kind: federated
base: {num-rounds: 2}
control: {partition: iid}
grid:
  - {partition: [noniid], classes-per-client: [1, 5]}
  - {partition: [iid]}
seeds: [1, 2, 3]
"""
TEST_ACCURACY = {"iid": [0.80, 0.82, 0.78], 5: [0.70, 0.70, 0.70], 1: [0.85, 0.78, 0.74]}


def test_each_arm_gets_its_paired_difference_with_a_95_percent_t_interval(tmp_path):
    results = tmp_path / "results"
    (results / "study").mkdir(parents=True)
    (results / "study" / "manifest.yaml").write_text(MANIFEST)
    manifest = load_manifest(results / "study" / "manifest.yaml", results)
    for run in manifest.runs:
        path = Path(run.cfg.run_dir)
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(run.cfg.to_dict()))
        arm = "iid" if run.cfg.partition == "iid" else run.cfg.classes_per_client
        test = TEST_ACCURACY[arm][run.cfg.seed - 1]
        rows = [{"round": 0, "val_accuracy": 0.1, "test_accuracy": 0.1, "test_loss": 2.3},
                {"round": 2, "val_accuracy": test, "test_accuracy": test, "test_loss": 1.0}]
        (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "DONE").write_text("")
    text = write_report(results / "study").read_text()
    diffs = pd.read_csv(results / "study" / "paired.csv").set_index("arm")
    nc5 = diffs.loc["partition=noniid classes-per-client=5"]
    assert nc5["control"] == "partition=iid" and nc5["n"] == 3
    half = 4.302653 * 0.02 / 3 ** 0.5  # t(0.975, 2) x sd of the differences [-0.10, -0.12, -0.08] / sqrt(3)
    assert (nc5["mean"], nc5["low"], nc5["high"]) == pytest.approx((-0.10, -0.10 - half, -0.10 + half), abs=1e-6)
    assert nc5["verdict"] == "lower"
    nc1 = diffs.loc["partition=noniid classes-per-client=1"]  # differences [0.05, -0.04, -0.04]
    assert nc1["mean"] == pytest.approx(-0.01) and nc1["low"] < 0 < nc1["high"]
    assert nc1["verdict"] == "no difference shown"
    assert "| partition=noniid classes-per-client=5 | partition=iid | 3 | -10.00 | [-14.97, -5.03] | lower |" in text
    assert "## Each arm against its control, paired by seed" in text


def test_run_folders_that_are_not_the_manifests_runs_stay_out_of_the_report(tmp_path):
    """A run folder left by an earlier grid (here: the same arm at another lr) is on disk but not in the manifest
    as it stands: the report leaves it out of every table and pair, and says so."""
    test_each_arm_gets_its_paired_difference_with_a_95_percent_t_interval(tmp_path)
    results = tmp_path / "results"
    before = pd.read_csv(results / "study" / "paired.csv")
    old = load_manifest(results / "study" / "manifest.yaml", results).runs[0]
    stale = Path(old.cfg.run_dir).with_name("federated-0123456789")
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps(old.cfg.replace(lr=0.5).to_dict()))
    rows = [{"round": 0, "val_accuracy": 0.1, "test_accuracy": 0.1, "test_loss": 2.3},
            {"round": 2, "val_accuracy": 0.99, "test_accuracy": 0.01, "test_loss": 9.0}]
    (stale / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(results / "study").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(results / "study" / "paired.csv"), before)
    assert "federated-0123456789" not in pd.read_csv(results / "study" / "summary.csv")["run_id"].tolist()
    assert "1 run folders here are not runs of the manifest as it stands" in text and "federated-0123456789" in text

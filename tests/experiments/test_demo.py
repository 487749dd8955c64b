"""`make demo` end to end: the demo manifest's five runs (centralized, FedAvg, sparse FedAvg) on real digits,
every one of which must learn, and its report."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ..conftest import background_command

ROOT = Path(__file__).resolve().parents[2]


@background_command("demo")
def _demo(folder):
    return ["make", "-C", str(ROOT), "demo", f"RESULTS={folder / 'results'}"]


@pytest.mark.slow
@pytest.mark.background("demo")
def test_make_demo_runs_every_demo_run_learns_and_writes_the_report(background):
    background.output("demo")
    tmp_path = background.folder("demo") / "results"
    runs = [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(("centralized-", "federated-"))]
    assert len(runs) == 5 and all((p / "DONE").exists() for p in runs)
    summary = pd.read_csv(tmp_path / "demo" / "summary.csv")
    gain = summary["test_accuracy"] - summary["step0_test_accuracy"]
    assert (gain > 0.05).all(), summary[["run_id", "step0_test_accuracy", "test_accuracy"]]  # every run learns...
    assert (summary["test_loss"] < summary["step0_test_loss"]).all(), summary[["run_id", "step0_test_loss", "test_loss"]]
    learned = summary.set_index(["kind", "partition", "optimizer"])["test_accuracy"]
    assert learned[("federated", "iid", "sgdm")] > learned[("federated", "noniid", "sgdm")] + 0.2
    assert summary["test_accuracy"][summary["kind"] == "centralized"].max() > 0.75
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Best centralized configuration by validation accuracy:** scheduler=" in report
    figures = {p.name for p in (tmp_path / "demo" / "figures").glob("*.png")}
    assert {"curves_centralized.png", "curves_federated.png", "bytes_per_round.png"} <= figures
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers == ""  # no SuperLink, SuperExec or Ray process outlives the run
